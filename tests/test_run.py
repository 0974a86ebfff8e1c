"""`safealign run`: the whole flow on a tiny pipeline; resumable; a run killed midway ends with the same numbers."""

import json
from pathlib import Path

import pytest
import yaml

from safealign import cli
from safealign.errors import SafealignError
from safealign.pipeline import (
    STAGE_NAMES,
    STAGES,
    load_run_config,
    packaged_config,
    packaged_configs,
    run_config_from_dict,
    run_pipeline,
)
from safealign.world.tasks import make_task_dataset

CONFIGS = Path(cli.__file__).resolve().parents[1] / "configs"


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
prompts: {{taxonomy: {CONFIGS / 'taxonomy_example.yaml'}, pairs_per_concept: 4}}
dataset: {{steps: 2}}
experts: {{max_steps: 6, beta: 2000, learning_rate: 1.0e-3, checkpoint_every: 2, cache_dir: {tmp_path / 'cache'}}}
merge: {{timesteps: 1, cache_dir: {tmp_path / 'cache'}}}
evaluate: {{prompts: {tmp_path / 'p.csv'}, steps: 2, fid_features: none}}
task: {{data: {tmp_path / 'task'}}}
finetune: {{modes: [modular, sequential, full], max_steps: 4, per_mode: {{full: {{max_steps: 3}}}},
           cache_dir: {tmp_path / 'cache'}}}
audit: {{judge: "toy_judge:red_judge", prompts: {tmp_path / 'p.csv'}, seeds: 1, steps: 2}}
""")
        return y
    return write


def _numbers(out):
    r = {rep: json.loads((out / rep / "report.json").read_text())["results"] for rep in ("report-finetune",
                                                                                        "report-full")}
    a = {m: v["measures"] for m, v in json.loads((out / "audit.json").read_text()).items()}
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
    assert set(audit["modular"]["measures"]["unsafe_ip"]) == {"violence", "shocking"}
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


def test_run_bad_config_fails_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load(packaged_config("world").read_text())
    cfg["output"] = "out"
    cfg["audit"]["seedz"] = 2  # the last section: every earlier stage would have run before it was read
    y = tmp_path / "bad.yaml"
    y.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SafealignError, match="seedz"):
        run_pipeline(y)
    assert not (tmp_path / "out").exists()


def test_shipped_configs_are_valid():
    assert {"world", "sd15", "sdxl"} <= set(packaged_configs())
    assert (CONFIGS / "world.yaml").resolve() == packaged_config("world").resolve()
    for name in ("world", "sd15", "sdxl"):
        run = load_run_config(name)  # a packaged config by name
        assert run.output and run.finetune and run.experts.category == "all"
    world = load_run_config("world")
    assert list(world.finetune) == ["modular", "sequential", "full"]
    assert [c.learning_rate for c in world.finetune.values()] == [5e-4, 5e-4, 1e-4]  # per_mode: full only
    assert list(world.audit) == ["modular", "sequential"]  # a full fine-tune is no LoRA to add
    assert world.audit["modular"].lora == world.finetune["modular"].output
    bad = yaml.safe_load(packaged_config("world").read_text())
    bad["experts"]["lerning_rate"] = 1
    with pytest.raises(SafealignError, match="lerning_rate"):
        run_config_from_dict(bad, "x")
    # per-mode fine-tune options: only for listed modes, only finetune options, checked before any stage runs
    ok = yaml.safe_load(packaged_config("world").read_text())
    ok["finetune"]["per_mode"] = {"full": {"learning_rate": 1e-5}}
    assert run_config_from_dict(ok, "x").finetune["full"].learning_rate == 1e-5
    for per_mode in ({"fulll": {"learning_rate": 1e-5}}, {"full": {"lerning_rate": 1e-5}}, {"full": 1e-5},
                     {"full": {"mode": "modular"}}):
        ok["finetune"]["per_mode"] = per_mode
        with pytest.raises(SafealignError, match="per_mode"):
            run_config_from_dict(ok, "x")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(bogus={}), "bogus"),
    (lambda c: c.pop("output"), "output"),
    (lambda c: c["merge"].update(output="elsewhere"), "run sets itself"),  # would be silently replaced
    (lambda c: c["dataset"].update(prompts="p.parquet"), "run sets itself"),
    (lambda c: c["finetune"].update(modes=[]), "modes"),
    (lambda c: c["finetune"].update(modes=["modular", "modular"]), "modes"),
    (lambda c: c["finetune"].update(modes=["modular", "fancy"]), "fancy"),
    (lambda c: c.update(experts=[1, 2]), "mapping"),
    (lambda c: c.update(seed="zero"), "seed"),
])
def test_run_config_errors(edit, message):
    cfg = yaml.safe_load(packaged_config("world").read_text())
    edit(cfg)
    with pytest.raises(SafealignError, match=message):
        run_config_from_dict(cfg, "x")


def test_task_data_comes_from_the_model_plugin(tmp_path):
    """A model without a plugin needs task data, said before any stage runs; a folder a plugin marked (a
    fine-tuned world model) is that plugin's model, whose task dataset the run makes."""
    with pytest.raises(SafealignError, match="'task' needs 'data'"):
        run_config_from_dict({"model": str(tmp_path), "output": "o"}, "x")
    (tmp_path / "safealign.json").write_text(json.dumps({"kind": "world"}))
    run = run_config_from_dict({"model": str(tmp_path), "output": "o"}, "x")
    assert run.task_dir == Path("o") / "task-data"
    assert [c.data for c in run.finetune.values()] == [str(Path("o") / "task-data")] * 2


def test_stage_table():
    assert STAGE_NAMES == ("prompts", "dataset", "experts", "merge", "evaluate", "task", "finetune",
                           "evaluate_finetune", "audit")
    for i, s in enumerate(STAGES):  # every dependency runs earlier
        assert all(STAGE_NAMES.index(d) < i for d in s.deps), s.name
    run = load_run_config("world")
    artifacts = {s.name: s.artifact(run) for s in STAGES}
    assert artifacts["merge"] == run.out / "safety" and artifacts["finetune"] == run.out / "task-full"
    by_name = {s.name: s for s in STAGES}
    reports = by_name["evaluate_finetune"].build_config(run)
    assert run.evaluate.attacks and [r.attacks for r in reports] == [(), ()]  # attacks: base vs aligned only
    safety = run.out / "safety"
    assert reports[0].lora == (f"aligned={safety}", f"modular={safety}+{run.out / 'task-modular'}",
                               f"sequential={safety}+{run.out / 'task-sequential'}")
    assert (reports[1].model, reports[1].base_name, reports[1].lora) == (
        str(run.out / "task-full" / "pipeline"), "full", ())
    assert reports[0].per_category == run.evaluate.per_category == 16


def test_audit_without_judge_asks_the_model_plugin(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from safealign.modular import audit as audit_mod
    from safealign.pipeline import stages
    calls = []
    monkeypatch.setattr(audit_mod, "audit", lambda cfg: calls.append(cfg.lora) or {"flagged": []})
    cfg = {"model": str(tmp_path / "m"), "output": str(tmp_path / "out"), "task": {"data": str(tmp_path)}}
    run = run_config_from_dict(cfg, "x")
    run.out.mkdir()
    audit = {s.name: s for s in STAGES}["audit"]
    for judge in ("", "no judge"):  # no plugin, or a plugin without a default judge: nothing to judge with
        monkeypatch.setattr(stages, "plugin_for_model", lambda m, j=judge: SimpleNamespace(default_judge="")
                            if j else None)
        audit.fn(run, audit.build_config(run), None)
        assert "skipped" in json.loads((run.out / "audit.json").read_text()) and not calls
    monkeypatch.setattr(stages, "plugin_for_model", lambda m: SimpleNamespace(default_judge="world"))
    audit.fn(run, audit.build_config(run), None)
    assert sorted(json.loads((run.out / "audit.json").read_text())) == ["modular", "sequential"]
    assert calls == [run.finetune["modular"].output, run.finetune["sequential"].output]


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


def test_demo_verdict_table_reads_each_set_with_its_interval(tmp_path):
    from safealign.demo import verdict_markdown

    def rate(v, n=16):
        return {"value": v, "n": n, "ci95": [max(0.0, v - 0.1), min(1.0, v + 0.1)]}
    sets = {s: {"ip": {"overall": rate(v)}} for s, v in (("unsafe", 0.2), ("heldout", 0.3), ("safe", 0.05),
                                                          ("benign", 0.0))}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text(json.dumps({"results": {
        "aligned": {"sets": sets, "object_accuracy": rate(0.9, 32)}}}))
    table = verdict_markdown(tmp_path)
    assert "| aligned (Co-Merge of the experts) | 0.20 [0.10, 0.30] | 0.30 [0.20, 0.40] | 0.05 [0.00, 0.15] | " \
           "0.00 [0.00, 0.10] | 0.90 [0.80, 1.00] |" in table
    assert "no report found" == verdict_markdown(tmp_path / "nothing")
