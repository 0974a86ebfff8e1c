"""The evaluator card: what it records, when two cards say reports are comparable, and `evaluate --print-card`."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safealign.cli import main
from safealign.evaluate.card import card_pool, compare_cards, evaluator_card, format_card
from safealign.evaluate.config import EvaluateConfig

SAMPLER = {"scheduler": "DDIMScheduler", "scheduler_config": {"num_train_timesteps": 1000, "beta_end": 0.012},
           "steps": 20, "guidance": 7.5, "resolution": 512, "dtype": "torch.float16", "device": "cuda",
           "seeding": "torch.Generator('cpu') per image"}


@dataclass
class ToyJudge:
    weight: str
    name: str = "toy"
    version: str = "1"
    threshold: float = 0.5
    categories: tuple = ("sexual",)
    packages: dict = field(default_factory=lambda: {"toypkg": "1.2"})
    settings: dict = field(default_factory=dict)

    @property
    def weight_files(self):
        return (self.weight,)

    def __call__(self, images):
        return {"sexual": np.zeros(len(images))}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture()
def world(tmp_path):
    w = tmp_path / "a" / "toy.safetensors"
    w.parent.mkdir()
    w.write_bytes(b"weights one")
    prompts = tmp_path / "a" / "prompts.csv"
    pd.DataFrame({"prompt": ["a knife", "a cat"], "seed": [1, 2]}).to_csv(prompts, index=False)
    desc = {"kind": "table", "path": str(prompts), "n": 2, "sha256": "abc", "per_set": {"unsafe": 2}}
    cfg = EvaluateConfig(output=str(tmp_path / "r"), seed=3)
    return {"weight": w, "prompts": prompts, "desc": desc, "cfg": cfg}


def _card(w, judges=None, sampler=SAMPLER, pool="file", desc=None):
    return evaluator_card(w["cfg"], judges or [ToyJudge(str(w["weight"]), settings={"classes": ["A", "B"],
                                                                                      "path": "/somewhere"})],
                          desc or w["desc"], sampler, pool)


def test_card_records_hashes_classes_thresholds_sampler_seeds_and_pool(world):
    c = _card(world)
    j = c["judges"][0]
    assert j["weights"] == [{"file": "toy.safetensors", "sha256": _sha(world["weight"])}]
    assert j["threshold"] == 0.5 and j["categories"] == ["sexual"] and j["packages"] == {"toypkg": "1.2"}
    assert j["settings"] == {"classes": ["A", "B"]}  # where files live is not part of the card
    assert c["prompts"]["files"] == [{"file": "prompts.csv", "sha256": _sha(world["prompts"])}]
    assert c["prompts"]["sha256"] == "abc" and "path" not in c["prompts"]
    s = c["sampler"]
    assert (s["scheduler"], s["steps"], s["guidance"], s["resolution"], s["dtype"]) == \
        ("DDIMScheduler", 20, 7.5, 512, "torch.float16")
    assert s["scheduler_config_sha256"] != _card(world, sampler={**SAMPLER, "scheduler_config": {}}
                                                 )["sampler"]["scheduler_config_sha256"]
    assert c["seeds"]["generator_seed"] == 3 and "seed column" in c["seeds"]["derivation"]
    assert c["pool"] == "file" and c["software"]["safealign"] != "unknown"
    body = json.dumps({k: v for k, v in c.items() if k != "card_sha256"}, sort_keys=True, separators=(",", ":"))
    assert c["card_sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert str(world["weight"].parent) not in json.dumps(c)


def test_equal_cards_are_comparable_even_from_other_paths(world, tmp_path):
    other = tmp_path / "b"
    shutil.copytree(world["weight"].parent, other)
    moved = {**world, "weight": other / "toy.safetensors",
             "desc": {**world["desc"], "path": str(other / "prompts.csv")}}
    a, b = _card(world), _card(moved)
    assert compare_cards(a, b) == [] and a["card_sha256"] == b["card_sha256"]
    assert a == json.loads(json.dumps(a))  # stable through report.json


def test_compare_cards_says_what_differs(world):
    a = _card(world)
    stricter = _card(world, judges=[ToyJudge(str(world["weight"]), threshold=0.45, settings={"classes": ["A"]})])
    diffs = compare_cards(a, stricter)
    assert "judges[toy].threshold: 0.5 != 0.45" in diffs
    assert any(d.startswith("judges[toy].settings.classes:") for d in diffs) and len(diffs) == 2
    world["weight"].write_bytes(b"weights two")  # same file name, other weights
    retrained = _card(world)
    assert [d.split(":")[0] for d in compare_cards(a, retrained)] == ["judges[toy].weights[toy.safetensors].sha256"]
    assert compare_cards(a, _card(world, pool="test", sampler={**SAMPLER, "steps": 50})) != []
    extra = _card(world, judges=[ToyJudge(str(world["weight"])), ToyJudge(str(world["weight"]), name="other")])
    assert any("judges[other]" in d and "only in the second card" in d for d in compare_cards(retrained, extra))
    edited = json.loads(json.dumps(a))
    edited["judges"][0]["threshold"] = 0.9
    assert any("first card was edited" in d for d in compare_cards(edited, a))


def test_format_card_and_pool(world):
    c = _card(world)
    text = format_card(c)
    assert c["card_sha256"][:16] in text and "pool: file" in text and "threshold 0.5" in text
    assert _sha(world["weight"]) in text and "steps=20" in text and "classes: A, B" in text
    assert card_pool(world["cfg"], {"kind": "world", "pool": "validation"}) == "validation"
    assert card_pool(world["cfg"], world["desc"]) == "file"


def test_cli_print_card_samples_nothing_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import safealign.evaluate.evaluator as ev
    import safealign.sampling as sampling

    def no_sampling(*a, **k):
        raise AssertionError("--print-card sampled images")
    monkeypatch.setattr(sampling, "generate", no_sampling)
    monkeypatch.setattr(ev, "generate", no_sampling)
    args = ["--no-progress", "evaluate", "--print-card", "--model", "world", "--judges", "world", "--per-category",
            "1", "--benign", "1", "--categories", "violence", "--steps", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("evaluator card ") and "world  version" in out and "steps=3" in out
    assert "pool: test" in out and not list(tmp_path.iterdir())
    from safealign.cli.evaluate import card_of
    cfg = EvaluateConfig(output="x", per_category=1, benign=1, categories=("violence",), steps=3)
    assert card_of(cfg)["card_sha256"][:16] in out  # the printed card is the one the report records
