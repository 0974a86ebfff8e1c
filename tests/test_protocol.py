"""The evaluation protocol: train, validation and test pools of prompts and seeds never meet; results over
several training seeds aggregate to a mean with an interval."""

import json
import random

import pytest

from safealign.errors import SafealignError
from safealign.protocol import POOLS, in_pool, pool_of, pool_seed


def test_pools_split_prompts_by_text_roughly_60_20_20():
    prompts = [f"a prompt number {i}" for i in range(3000)]
    share = {p: sum(pool_of(x) == p for x in prompts) / len(prompts) for p in POOLS}
    assert abs(share["train"] - 0.6) < 0.04 and abs(share["validation"] - 0.2) < 0.03
    assert abs(share["test"] - 0.2) < 0.03
    assert pool_of("A Red Knife ") == pool_of("a red knife")  # case and spacing do not move a prompt


def test_pool_seeds_differ_between_pools_and_purposes():
    seeds = {pool_seed(0, p, "evaluate", "x") for p in POOLS} | {pool_seed(0, "test", "audit", "x")}
    assert len(seeds) == 4
    with pytest.raises(SafealignError, match="pool"):
        pool_seed(0, "tset", "x")


def test_world_sets_come_from_their_pools_and_never_meet():
    from safealign.world.evaluation import benign_prompts, evaluation_prompts
    from safealign.world.plugin import PLUGIN
    test = evaluation_prompts(4, 8, 0, pool="test").table
    val = evaluation_prompts(4, 8, 0, pool="validation").table
    assert all(in_pool(p, "test") for p in test.loc[test["set"] != "safe", "prompt"])
    assert all(in_pool(p, "validation") for p in val.loc[val["set"] != "safe", "prompt"])
    assert not set(test["prompt"]) & set(val["prompt"]) and not set(test["seed"]) & set(val["seed"])
    # the dataset stage draws only training prompts
    gen = PLUGIN.prompt_pairs("knife", random.Random(0))
    train = [next(gen)[0] for _ in range(50)]
    assert all(in_pool(p, "train") for p in train) and not set(train) & set(test["prompt"])
    # anchors come from train, what training watches from validation
    assert all(in_pool(p, "validation") for p in benign_prompts(10, 0, "validation"))
    assert all(in_pool(p, "train") for p in benign_prompts(10, 0, "train"))


def test_evaluation_seeds_and_prompts_differ_from_every_dataset_ones():
    """The world's evaluation images never reuse a prompt or a seed the dataset stage drew its pairs with."""
    from safealign.data.config import PromptsConfig
    from safealign.data.prompts import build_prompts
    from safealign.world.evaluation import evaluation_prompts
    data, _ = build_prompts(PromptsConfig(model="world", output="unused.parquet", pairs_per_concept=6))
    ev = evaluation_prompts(8, 16, 0).table
    assert len(data) > 100 and len(ev) > 100
    assert not set(ev["prompt"]) & (set(data["unsafe_prompt"]) | set(data["safe_prompt"]))
    assert not set(ev["seed"]) & set(data["seed"])


def _report(folder, pool, values):
    folder.mkdir(parents=True)
    sets = {s: {"ip": {"overall": {"value": v}}} for s, v in values.items()}
    (folder / "report.json").write_text(json.dumps({
        "pool": pool, "prompts": {"sha256": "abc"}, "sampler": {"scheduler": "DDIM", "steps": 12},
        "judges": [{"name": "world", "version": "1", "threshold": 0.5}],
        "results": {"aligned": {"sets": sets}}}))
    return folder


def test_aggregate_over_training_seeds(tmp_path):
    from safealign.evaluate.aggregate import aggregate
    paths = [_report(tmp_path / f"s{i}", "test", {"unsafe": v}) for i, v in enumerate((0.2, 0.3, 0.4))]
    agg = aggregate(paths)
    cell = agg["models"]["aligned"]["ip/unsafe"]
    assert cell["mean"] == pytest.approx(0.3) and cell["std"] == pytest.approx(0.1) and cell["n"] == 3
    # t(0.975, 2) = 4.303: half-width 4.303 * 0.1 / sqrt(3)
    assert cell["ci95"][1] - 0.3 == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    other = _report(tmp_path / "v", "validation", {"unsafe": 0.1})
    with pytest.raises(SafealignError, match="pool"):
        aggregate([paths[0], other])
    with pytest.raises(SafealignError, match="at least two"):
        aggregate(paths[:1])


def test_aggregate_command(tmp_path, capsys):
    from safealign import cli
    paths = [str(_report(tmp_path / f"s{i}", "test", {"unsafe": v})) for i, v in enumerate((0.2, 0.4))]
    assert cli.main(["aggregate", *paths, "--output", str(tmp_path / "agg.json")]) == 0
    assert "ip/unsafe" in capsys.readouterr().out
    agg = json.loads((tmp_path / "agg.json").read_text())
    assert agg["models"]["aligned"]["ip/unsafe"]["mean"] == pytest.approx(0.3)
    assert cli.main(["aggregate", paths[0], str(tmp_path / "missing")]) == 2


def test_training_watches_validation_prompts_only():
    from types import SimpleNamespace

    from safealign.train.config import ExpertConfig
    from safealign.train.dpo import _validation_pairs
    from safealign.world.plugin import PLUGIN
    cfg = ExpertConfig(model="world", dataset="unused", category="violence", output="unused", validation_prompts=6)
    unsafe, safe = _validation_pairs(cfg, SimpleNamespace(plugin=PLUGIN), None, "violence")
    assert len(unsafe) == len(safe) == 6 and all(in_pool(p, "validation") for p in unsafe)
