"""`safealign run`: the whole flow on a tiny pipeline; resumable; a run killed midway ends with the same numbers."""

import json

import pytest

from safealign import cli
from safealign.world.tasks import make_task_dataset


@pytest.fixture()
def run_config(tmp_path, tiny_paths):
    (tmp_path / "p.csv").write_text("prompt,category\na knife,violence\na skull,shocking\n")
    make_task_dataset(tmp_path / "task", n=8)
    y = tmp_path / "run.yaml"

    def write(out):
        y.write_text(f"""
model: {tiny_paths['sd1']}
output: {out}
seed: 0
categories: [violence, shocking]
prompts: {{taxonomy: {cli.__file__.rsplit('/src/', 1)[0]}/configs/taxonomy_example.yaml, pairs_per_concept: 4}}
dataset: {{steps: 2}}
experts: {{max_steps: 6, beta: 2000, learning_rate: 1.0e-3, checkpoint_every: 2, cache_dir: {tmp_path / 'cache'}}}
merge: {{timesteps: 1, cache_dir: {tmp_path / 'cache'}}}
evaluate: {{prompts: {tmp_path / 'p.csv'}, steps: 2, bootstrap: 50, fid_features: none}}
task: {{data: {tmp_path / 'task'}}}
finetune: {{modes: [modular, sequential, full], max_steps: 4, per_mode: {{full: {{max_steps: 3}}}},
           cache_dir: {tmp_path / 'cache'}}}
audit: {{judge: "toy_judge:red_judge", prompts: {tmp_path / 'p.csv'}, seeds: 1, num_inference_steps: 2}}
""")
        return y
    return write


def _numbers(out):
    r = {rep: json.loads((out / rep / "report.json").read_text())["results"] for rep in ("report-finetune",
                                                                                        "report-full")}
    a = {m: v["categories"] for m, v in json.loads((out / "audit.json").read_text()).items()}
    return json.dumps([r, a], sort_keys=True)


def test_run_resumes_and_matches_uninterrupted(run_config, tmp_path, capsys, monkeypatch):
    ref = tmp_path / "ref"
    assert cli.main(["--no-progress", "run", str(run_config(ref))]) == 0
    assert (ref / "report" / "index.html").is_file() and (ref / "report-finetune" / "index.html").is_file()
    state = json.loads((ref / "run_state.json").read_text())
    assert list(state) == ["prompts", "dataset", "experts", "merge", "evaluate", "task", "finetune",
                           "evaluate_finetune", "audit"]
    full = json.loads((ref / "report-full" / "report.json").read_text())
    assert list(full["results"]) == ["full"]  # the fully fine-tuned pipeline, under its own name
    recorded = {m: json.loads((ref / f"task-{m}" / "safealign.json").read_text())["config"]["max_steps"]
                for m in ("modular", "sequential", "full")}
    assert recorded == {"modular": 4, "sequential": 4, "full": 3}  # per_mode overrides the full fine-tune alone
    audit = json.loads((ref / "audit.json").read_text())
    assert sorted(audit) == ["modular", "sequential"]  # task LoRAs only: a full fine-tune is no LoRA to add
    assert set(audit["modular"]["categories"]) == {"violence", "shocking"}
    capsys.readouterr()
    assert cli.main(["--no-progress", "run", str(run_config(ref))]) == 0  # everything up to date
    assert capsys.readouterr().out.count("up to date") == 9

    # interrupted in the middle of the second expert, then re-run
    from safealign.train import dpo
    real = dpo.dpo_preserve_loss  # the loss the training loop calls
    calls = {"n": 0}

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(dpo, "dpo_preserve_loss", crash)
    again = tmp_path / "again"
    assert cli.main(["--no-progress", "run", str(run_config(again))]) == 130  # interrupted
    assert calls["n"] >= 10
    monkeypatch.setattr(dpo, "dpo_preserve_loss", real)
    assert cli.main(["--no-progress", "run", str(run_config(again))]) == 0
    assert _numbers(again) == _numbers(ref)
    # --from redoes a stage and everything after it, items (each fine-tune) included
    capsys.readouterr()
    item = again / "task-modular" / "run_item.json"
    before = item.read_text()
    assert cli.main(["--no-progress", "run", str(run_config(again)), "--from", "merge"]) == 0
    assert capsys.readouterr().out.count("up to date") == 3  # prompts, dataset, experts
    assert item.read_text() != before  # retrained, not kept because its config matched
    assert _numbers(again) == _numbers(ref)


def test_run_bad_config(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("output: x\nbogus: {}\n")
    assert cli.main(["run", str(y)]) == 2
    y.write_text("model: world\n")
    assert cli.main(["run", str(y)]) == 2
    y.write_text("output: x\n")
    assert cli.main(["run", str(y), "--from", "nope"]) == 2


def test_shipped_configs_are_valid():
    from pathlib import Path

    from safealign.configuration import load_yaml
    from safealign.pipeline.runner import Run, check_sections
    root = Path(cli.__file__).resolve().parents[2] / "configs"
    for name in ("world.yaml", "sd15.yaml", "sdxl.yaml"):
        cfg = load_yaml(root / name)
        check_sections(cfg, name)
        Run(cfg, name)
    import yaml
    bad = yaml.safe_load((root / "world.yaml").read_text())
    bad["experts"]["lerning_rate"] = 1
    with pytest.raises(Exception, match="lerning_rate"):
        check_sections(bad, "x")
    # per-mode fine-tune options: only for listed modes, only finetune options, checked before any stage runs
    ok = yaml.safe_load((root / "world.yaml").read_text())
    ok["finetune"]["per_mode"] = {"full": {"learning_rate": 1e-5}}
    check_sections(ok, "x")
    for per_mode in ({"fulll": {"learning_rate": 1e-5}}, {"full": {"lerning_rate": 1e-5}}, {"full": 1e-5}):
        ok["finetune"]["per_mode"] = per_mode
        with pytest.raises(Exception, match="per_mode"):
            check_sections(ok, "x")


def test_demo_summary_counts_safe_twins_in_attribute_accuracy():
    from safealign.demo import summary_rows
    sets = {"unsafe": {"hazard_rate": {"per_category": {"hate": {"value": 0.5}}, "overall": {"value": 0.5}}},
            "safe": {"ip": {"overall": {"value": 0.1}}, "attribute_accuracy": {"mean": 0.3}},
            "benign": {"ip": {"overall": {"value": 0.0}}, "attribute_accuracy": {"mean": 0.9}}}
    # the model-level figure (safe twins and benign prompts together) wins over the benign prompts' own
    [row] = summary_rows({"m": {"sets": sets, "attribute_accuracy": {"mean": 0.6}, "fid": {"fid": 10.0}}})
    assert (row["hate"], row["unsafe"], row["safe"], row["attr"], row["fid"]) == (0.5, 0.5, 0.1, 0.6, 10.0)
    [row] = summary_rows({"m": {"sets": sets}})  # an older report without it: the benign prompts'
    assert row["attr"] == 0.9 and row["fid"] != row["fid"]
