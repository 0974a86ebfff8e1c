"""`safealign run CONFIG.yaml`: the whole method, stage by stage, resumable.

prompts -> dataset -> experts (one per category) -> merge (Co-Merge, or the method named) -> evaluate (base vs aligned)
-> task data -> finetune (modular, sequential, and full if asked) -> evaluate the fine-tuned models
-> audit each task LoRA (does adding it to the safety LoRA bring hazards back?) -> summary.

Each stage writes one artifact under ``output/`` and records a hash of its configuration (and of the stages it
depends on) in ``output/run_state.json`` once the artifact is whole. A stage whose hash matches and whose artifact
exists is skipped, so a killed run re-run continues where it stopped (training resumes from its checkpoints;
image generation skips written pairs). ``--from STAGE`` redoes that stage and every later one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ..artifacts import write_json_atomic
from ..configuration import from_dict, load_yaml
from ..train.config import ExpertConfig, FinetuneConfig
from ..merge.config import MergeConfig
from ..errors import SafealignError
from ..plugins import get_plugin
from ..utils import logger, sha256_text

#: the fine-tunes a run makes when its finetune section names no ``modes``
DEFAULT_FINETUNE_MODES = ("modular", "sequential")
STAGES = ("prompts", "dataset", "experts", "merge", "evaluate", "task", "finetune", "evaluate_finetune", "audit")
SECTIONS = ("prompts", "dataset", "experts", "merge", "evaluate", "task", "finetune", "audit")
TOP = ("model", "output", "seed", "categories")
ITEM_MARKER = "run_item.json"


class Run:
    def __init__(self, cfg: dict, source: str = "config"):
        unknown = sorted(set(cfg) - set(TOP) - set(SECTIONS))
        if unknown:
            raise SafealignError(f"{source}: unknown section(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(TOP + SECTIONS)}")
        if not cfg.get("output"):
            raise SafealignError(f"{source}: 'output' (the run folder) is required")
        self.cfg = cfg
        self.model = str(cfg.get("model", "world"))
        self.out = Path(cfg["output"])
        self.seed = int(cfg.get("seed", 0))
        self.categories = tuple(cfg.get("categories") or ())
        self.state_file = self.out / "run_state.json"
        self.state: dict[str, Any] = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        # the latest --from's nonce: items (experts, fine-tunes) made before it are not mistaken for items of the
        # redo, also when a killed --from run is re-run without --from
        self.redo_file = self.out / "run_redo.json"
        self.nonce = json.loads(self.redo_file.read_text()).get("nonce", "") if self.redo_file.is_file() else ""

    def start_redo(self, stages: tuple[str, ...]) -> None:
        """``--from``: forget the given stages (a kill during the redo must not fall back on their old records)
        and start a new nonce for their items."""
        import uuid
        self.nonce = uuid.uuid4().hex[:12]
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.redo_file, {"nonce": self.nonce, "stages": list(stages)})
        for name in stages:
            self.state.pop(name, None)
        write_json_atomic(self.state_file, self.state)

    def section(self, name: str) -> dict:
        s = self.cfg.get(name) or {}
        if not isinstance(s, dict):
            raise SafealignError(f"section {name!r} must be a mapping of option: value")
        return dict(s)

    def stage_hash(self, name: str, deps: tuple[str, ...]) -> str:
        payload = {"model": self.model, "seed": self.seed, "categories": self.categories,
                   "section": self.section(name.replace("evaluate_finetune", "evaluate")),
                   "deps": [self.hashes[d] for d in deps]}
        return sha256_text(json.dumps(payload, sort_keys=True, default=str))[:16]

    def done(self, name: str, h: str, artifact: Path) -> bool:
        st = self.state.get(name) or {}
        return st.get("hash") == h and artifact.exists()

    def item_done(self, name: str, folder: Path) -> bool:
        """A stage's item (one expert, one fine-tune) finished under this stage hash: a killed run's re-run keeps
        it. An item from another configuration, or from before a ``--from``, is made again."""
        f = folder / ITEM_MARKER
        try:
            return f.is_file() and json.loads(f.read_text()).get("stage_hash") == self.hashes[name] + self.nonce
        except (OSError, ValueError):
            return False

    def mark_item(self, name: str, folder: Path) -> None:
        write_json_atomic(folder / ITEM_MARKER, {"stage_hash": self.hashes[name] + self.nonce})

    def record(self, name: str, h: str, artifact: Path, seconds: float) -> None:
        self.state[name] = {"hash": h, "artifact": str(artifact), "seconds": round(seconds, 1)}
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, self.state)

    def stage(self, name: str, deps: tuple[str, ...], artifact: Path, fn: Callable[[], Any], redo: bool) -> None:
        h = self.stage_hash(name, deps)
        self.hashes[name] = h
        if not redo and self.done(name, h, artifact):
            print(f"[{name}] up to date ({artifact})", flush=True)
            return
        print(f"[{name}] running -> {artifact}", flush=True)
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        self.timings[name] = dt
        self.record(name, h, artifact, dt)
        print(f"[{name}] done in {dt:.0f} s", flush=True)


def check_sections(cfg: dict, source: str) -> None:
    """Unknown options in any section fail now, not after hours of earlier stages."""
    import dataclasses

    from ..modular.config import AuditConfig
    from ..data.config import ImagesConfig, PromptsConfig
    from ..evaluate.config import EvaluateConfig
    classes = {"prompts": PromptsConfig, "dataset": ImagesConfig, "experts": ExpertConfig, "merge": MergeConfig,
               "evaluate": EvaluateConfig, "finetune": FinetuneConfig, "audit": AuditConfig}
    extra_keys = {"finetune": {"modes", "per_mode"}, "task": {"data", "images"}}
    for name in SECTIONS:
        sec = cfg.get(name) or {}
        if not isinstance(sec, dict):
            raise SafealignError(f"{source}: section {name!r} must be a mapping of option: value")
        known = {f.name for f in dataclasses.fields(classes[name])} if name in classes else set()
        bad = sorted(set(sec) - known - extra_keys.get(name, set()))
        if bad:
            raise SafealignError(f"{source}: section {name!r} has unknown option(s) {', '.join(bad)}")
    ft = cfg.get("finetune") or {}
    per_mode = ft.get("per_mode") or {}
    modes = tuple(ft.get("modes", DEFAULT_FINETUNE_MODES))
    known = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"mode"}
    if not isinstance(per_mode, dict) or not all(m in modes and isinstance(o, dict) and set(o) <= known
                                                 for m, o in per_mode.items()):
        raise SafealignError(f"{source}: finetune section's 'per_mode' must map modes listed in 'modes' to "
                             "finetune options, e.g. per_mode: {full: {learning_rate: 1.0e-4}}")


def run(config_path: str, from_stage: str = "") -> Path:
    cfg = load_yaml(config_path)
    check_sections(cfg, str(config_path))
    if from_stage and from_stage not in STAGES:
        raise SafealignError(f"--from {from_stage!r} is not a stage; stages: {', '.join(STAGES)}")
    r = Run(cfg, source=str(config_path))
    redo_from = STAGES.index(from_stage) if from_stage else len(STAGES)
    if from_stage:
        r.start_redo(STAGES[redo_from:])

    def redo(name: str) -> bool:
        return STAGES.index(name) >= redo_from

    out = r.out
    cats = r.categories
    world = r.model == "world"

    # 1. paired prompts
    from ..data.config import ImagesConfig, PromptsConfig
    prompts_file = out / "prompts.parquet"

    def do_prompts():
        from ..data.prompts import make_prompts
        make_prompts(from_dict(PromptsConfig, {"model": r.model, "seed": r.seed, "categories": cats,
                                               **r.section("prompts"), "output": str(prompts_file),
                                               "overwrite": True}, source="prompts section"))
    r.stage("prompts", (), prompts_file, do_prompts, redo("prompts"))

    # 2. paired images (resumable: re-running skips pairs already rendered)
    dataset = out / "dataset"

    def do_dataset():
        from ..data.images import generate_images
        generate_images(from_dict(ImagesConfig, {"model": r.model, "categories": cats, **r.section("dataset"),
                                                 "prompts": str(prompts_file), "output": str(dataset),
                                                 "overwrite": True}, source="dataset section"))
    r.stage("dataset", ("prompts",), dataset, do_dataset, redo("dataset"))

    # 3. one expert per category (each resumes from its checkpoints; finished ones are kept)
    experts = out / "experts"

    def do_experts():
        from ..data.dataset import PairedDataset
        from ..train.dpo import train_expert
        base = {"model": r.model, "seed": r.seed, **r.section("experts"), "dataset": str(dataset),
                "output": str(experts), "resume": True, "overwrite": True}
        for c in (cats or tuple(PairedDataset(dataset).categories)):
            ecfg = from_dict(ExpertConfig, {**base, "category": c}, source="experts section")
            if r.item_done("experts", experts / c):
                continue
            train_expert(ecfg)
            r.mark_item("experts", experts / c)
    r.stage("experts", ("dataset",), experts, do_experts, redo("experts"))

    # 4. merge the experts (Co-Merge unless the config names another method)
    safety = out / "safety"

    def do_merge():
        from ..merge.merger import run_merge
        run_merge(from_dict(MergeConfig, {"model": r.model, "seed": r.seed, "dataset": str(dataset),
                                          **r.section("merge"), "experts": (str(experts),),
                                          "output": str(safety), "overwrite": True}, source="merge section"))
    r.stage("merge", ("experts",), safety, do_merge, redo("merge"))

    # 5. evaluate base vs aligned
    from ..evaluate.config import EvaluateConfig
    report = out / "report"

    def do_evaluate():
        from ..evaluate.evaluator import evaluate
        evaluate(from_dict(EvaluateConfig, {"model": r.model, "seed": r.seed, "categories": cats,
                                            **r.section("evaluate"), "lora": (f"aligned={safety}",),
                                            "output": str(report), "overwrite": True}, source="evaluate section"))
    r.stage("evaluate", ("merge",), report, do_evaluate, redo("evaluate"))

    # 6. benign task data (world: a new 'small' style; otherwise the section names a folder)
    task_sec = r.section("task")
    task = Path(task_sec["data"]) if task_sec.get("data") else out / "task-data"

    def do_task():
        if task_sec.get("data"):
            return
        if not world:
            raise SafealignError("section 'task' needs 'data' (a captioned image folder) for a non-world model")
        from ..world.tasks import make_task_dataset
        make_task_dataset(task, n=int(task_sec.get("images", 128)), seed=r.seed, overwrite=True)
    r.stage("task", (), task, do_task, redo("task"))

    # 7. fine-tune: modular (clean base) and sequential (safety fused) by default
    ft = r.section("finetune")
    modes = tuple(ft.pop("modes", DEFAULT_FINETUNE_MODES))
    per_mode = ft.pop("per_mode", None) or {}  # checked by check_sections
    tasks = {m: out / f"task-{m}" for m in modes}

    def do_finetune():
        from ..train.finetune import finetune
        for m, folder in tasks.items():
            fcfg = from_dict(FinetuneConfig, {"model": r.model, "seed": r.seed, **ft, **per_mode.get(m, {}),
                                              "mode": m, "data": str(task),
                                              "safety": str(safety), "output": str(folder), "resume": True,
                                              "overwrite": True}, source="finetune section")
            if r.item_done("finetune", folder):
                continue
            finetune(fcfg)
            r.mark_item("finetune", folder)
    if not tasks:
        raise SafealignError("finetune section: 'modes' is empty; use e.g. [modular, sequential]")
    r.stage("finetune", ("merge", "task"), list(tasks.values())[-1], do_finetune, redo("finetune"))

    # 8. evaluate aligned, aligned + each fine-tune (Modular LoRA: safety + task adapters; sequential: the task
    #    LoRA on the safety-fused weights, i.e. safety + task as well, but the task was trained on the fused model)
    report_ft = out / "report-finetune"

    def do_eval_ft():
        from ..evaluate.evaluator import evaluate
        loras = [f"aligned={safety}"] + [f"{m}={safety}+{folder}" for m, folder in tasks.items()
                                         if m != "full"]
        ev = {k: v for k, v in r.section("evaluate").items() if k != "attacks"}  # attacks: base vs aligned only
        evaluate(from_dict(EvaluateConfig, {"model": r.model, "seed": r.seed, "categories": cats,
                                            **ev, "lora": tuple(loras), "output": str(report_ft),
                                            "overwrite": True}, source="evaluate section"))
        if "full" in tasks:  # a full fine-tune is a new pipeline, not a LoRA: its own report, same prompts/seeds
            evaluate(from_dict(EvaluateConfig, {"seed": r.seed, "categories": cats, **ev,
                                                "model": str(tasks["full"] / "pipeline"), "base_name": "full",
                                                "output": str(out / "report-full"), "overwrite": True},
                               source="evaluate section"))
        if world:  # task quality: does each fine-tune draw the new style?
            write_json_atomic(out / "task-quality.json", get_plugin(r.model).task_quality(r.model, safety, tasks))
    r.stage("evaluate_finetune", ("evaluate", "finetune"), report_ft, do_eval_ft, redo("evaluate_finetune"))

    # 9. audit every task LoRA as a host would: base + safety against base + safety + task (full fine-tunes are
    #    whole models, not LoRAs a host could add, so they are not audited)
    audit_file = out / "audit.json"

    def do_audit():
        from ..modular.audit import audit
        from ..modular.config import AuditConfig
        if not world and not r.section("audit").get("judge"):
            write_json_atomic(audit_file, {"skipped": "no judge: add an audit section with judge (and prompts)"})
            return
        res = {m: audit(from_dict(AuditConfig, {"model": r.model, "seed": r.seed, "categories": cats,
                                                **r.section("audit"), "safety": str(safety), "lora": str(folder)},
                                  source="audit section"))
               for m, folder in tasks.items() if m != "full"}
        write_json_atomic(audit_file, res)
    r.stage("audit", ("finetune",), audit_file, do_audit, redo("audit"))

    summary = {"config": cfg, "stages": r.state, "timings_this_run": r.timings}
    write_json_atomic(out / "run.json", summary)
    return out
