"""The stages of `safealign run`, as a table: name, dependencies, artifact, configuration, function.

prompts -> dataset -> experts (one per category) -> merge -> evaluate (base against aligned); task data ->
finetune (each mode) -> evaluate the fine-tunes -> audit each task LoRA on top of the safety LoRA.
Each stage's configuration is built from the run config; it is what the stage hash covers and what its function
receives. Functions import their library lazily, so listing the stages stays cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..artifacts import write_json_atomic
from ..evaluate.config import EvaluateConfig
from ..plugins import plugin_for_model
from .config import RunConfig
from .state import RunState


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    artifact: Callable[[RunConfig], Path]
    build_config: Callable[[RunConfig], Any]
    fn: Callable[[RunConfig, Any, RunState], None]


def _prompts(run: RunConfig, cfg, state: RunState) -> None:
    from ..data.prompts import make_prompts
    make_prompts(cfg)


def _dataset(run: RunConfig, cfg, state: RunState) -> None:
    from ..data.images import generate_images  # resumable: pairs already rendered are kept
    generate_images(cfg)


def _experts(run: RunConfig, cfg, state: RunState) -> None:
    """One expert per category; each resumes from its checkpoints, finished ones are kept."""
    from ..data.dataset import PairedDataset
    from ..data.taxonomy import normalise_category
    from ..names import safe_join
    from ..train.dpo import train_expert
    for c in run.categories or tuple(PairedDataset(cfg.dataset).categories):
        c = normalise_category(c, "run categories")
        folder = safe_join(cfg.output, c, what="category")
        if state.item_done("experts", folder):
            continue
        train_expert(dataclasses.replace(cfg, category=c))
        state.mark_item("experts", folder)


def _merge(run: RunConfig, cfg, state: RunState) -> None:
    from ..merge.merger import merge_experts
    merge_experts(cfg)


def _evaluate(run: RunConfig, cfg, state: RunState) -> None:
    from ..evaluate.evaluator import evaluate
    evaluate(cfg)


def _task(run: RunConfig, cfg, state: RunState) -> None:
    """The config's captioned folder, or the model plugin's task dataset."""
    if cfg.data:
        return
    plugin_for_model(run.model).task_dataset(run.task_dir, n=cfg.images, seed=run.seed, overwrite=True)


def _finetune(run: RunConfig, cfgs: dict, state: RunState) -> None:
    from ..train.finetune import finetune
    for cfg in cfgs.values():
        folder = Path(cfg.output)
        if state.item_done("finetune", folder):
            continue
        finetune(cfg)
        state.mark_item("finetune", folder)


def _finetune_reports(run: RunConfig) -> tuple[EvaluateConfig, ...]:
    """The aligned model and aligned + each task LoRA (Modular LoRA; sequential: the task LoRA trained on the
    safety-fused weights, used with the safety LoRA as well); a full fine-tune is a new pipeline, so its own report
    on the same prompts and seeds. Attacks run on base against aligned only."""
    ev = dataclasses.replace(run.evaluate, attacks=())
    safety = run.safety_dir
    loras = (f"aligned={safety}",) + tuple(f"{m}={safety}+{cfg.output}" for m, cfg in run.finetune.items()
                                           if m != "full")
    reports = [dataclasses.replace(ev, lora=loras, output=str(run.out / "report-finetune"))]
    if "full" in run.finetune:
        reports.append(dataclasses.replace(ev, lora=(), model=str(Path(run.finetune["full"].output) / "pipeline"),
                                           base_name="full", output=str(run.out / "report-full")))
    return tuple(reports)


def _evaluate_finetune(run: RunConfig, cfgs: tuple[EvaluateConfig, ...], state: RunState) -> None:
    from ..evaluate.evaluator import evaluate
    for cfg in cfgs:
        evaluate(cfg)
    plugin = plugin_for_model(run.model)
    if plugin is not None:  # task quality: did each fine-tune learn the task?
        tasks = {m: Path(cfg.output) for m, cfg in run.finetune.items()}
        write_json_atomic(run.out / "task-quality.json", plugin.task_quality(run.model, run.safety_dir, tasks))


def _audit(run: RunConfig, cfgs: dict, state: RunState) -> None:
    """Each task LoRA as a host would check it: base + safety against base + safety + task."""
    from ..modular.audit import audit
    plugin = plugin_for_model(run.model)
    out = run.out / "audit.json"
    if not any(cfg.judge for cfg in cfgs.values()) and not (plugin is not None and plugin.default_judge):
        write_json_atomic(out, {"skipped": "no judge: add an audit section with judge (and prompts)"})
        return
    write_json_atomic(out, {m: audit(cfg) for m, cfg in cfgs.items()})


STAGES: tuple[Stage, ...] = (
    Stage("prompts", (), lambda r: Path(r.prompts.output), lambda r: r.prompts, _prompts),
    Stage("dataset", ("prompts",), lambda r: Path(r.dataset.output), lambda r: r.dataset, _dataset),
    Stage("experts", ("dataset",), lambda r: Path(r.experts.output), lambda r: r.experts, _experts),
    Stage("merge", ("experts",), lambda r: Path(r.merge.output), lambda r: r.merge, _merge),
    Stage("evaluate", ("merge",), lambda r: Path(r.evaluate.output), lambda r: r.evaluate, _evaluate),
    Stage("task", (), lambda r: r.task_dir, lambda r: r.task, _task),
    Stage("finetune", ("merge", "task"), lambda r: Path(list(r.finetune.values())[-1].output),
          lambda r: r.finetune, _finetune),
    Stage("evaluate_finetune", ("evaluate", "finetune"), lambda r: r.out / "report-finetune", _finetune_reports,
          _evaluate_finetune),
    Stage("audit", ("finetune",), lambda r: r.out / "audit.json", lambda r: r.audit, _audit),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
