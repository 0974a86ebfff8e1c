"""The run config of `safealign run`: top-level settings and one typed section per stage.

A YAML run config names the model, the output folder, the seed, the categories, and one section per stage holding
that stage's options. :func:`load_run_config` builds every stage's config from its section (the run fills in the
paths that link the stages), so an unknown or invalid option fails before any stage runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_type_hints

from ..configuration import field, from_dict, load_yaml
from ..data.config import ImagesConfig, PromptsConfig
from ..errors import SafealignError
from ..evaluate.config import EvaluateConfig
from ..merge.config import MergeConfig
from ..modular.config import AuditConfig
from ..plugins import plugin_for_model
from ..train.config import ExpertConfig, FinetuneConfig

#: the fine-tunes a run makes when its finetune section names no ``modes``
DEFAULT_FINETUNE_MODES = ("modular", "sequential")
TOP = ("model", "output", "seed", "categories")
SECTIONS = ("prompts", "dataset", "experts", "merge", "evaluate", "task", "finetune", "audit")

#: options the run sets itself (the paths that link the stages, resume and overwrite); a section may not set them
RUN_OWNED = {
    "prompts": ("output", "overwrite"),
    "dataset": ("prompts", "output", "overwrite"),
    "experts": ("category", "dataset", "output", "resume", "overwrite"),
    "merge": ("experts", "output", "overwrite"),
    "evaluate": ("lora", "output", "overwrite"),
    "finetune": ("mode", "data", "safety", "output", "resume", "overwrite"),
    "audit": ("safety", "lora"),
}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The top level of a run config (each stage's section may override model, seed and categories)."""

    model: str = field("world", "base pipeline folder, cached hub id, or a model plugin's name ('world')")
    output: str = field("", "the run folder (relative to the current directory)")
    seed: int = field(0, "seed of every stage")
    categories: tuple[str, ...] = field((), "only these categories (default: all)")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The benign fine-tuning data of a run."""

    data: str = field("", "captioned image folder (metadata.jsonl); empty: the model plugin makes one")
    images: int = field(128, "images in the model plugin's task dataset")

    def __post_init__(self) -> None:
        if self.images < 1:
            raise SafealignError(f"task section: images must be >= 1, got {self.images}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated run: the top-level settings and every stage's config, paths filled in."""

    model: str
    output: str
    seed: int
    categories: tuple[str, ...]
    prompts: PromptsConfig
    dataset: ImagesConfig
    experts: ExpertConfig  # category 'all': each expert replaces it with its own
    merge: MergeConfig
    evaluate: EvaluateConfig  # base against the aligned model
    task: TaskConfig
    finetune: Mapping[str, FinetuneConfig]  # mode -> config, in the order of the section's 'modes'
    audit: Mapping[str, AuditConfig]  # mode -> config, for every fine-tune that is a LoRA
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def out(self) -> Path:
        return Path(self.output)

    @property
    def task_dir(self) -> Path:
        return Path(self.task.data) if self.task.data else self.out / "task-data"

    @property
    def safety_dir(self) -> Path:
        return Path(self.merge.output)


def _section(data: Mapping, name: str, source: str) -> dict:
    sec = data.get(name) or {}
    if not isinstance(sec, Mapping):
        raise SafealignError(f"{source}: section {name!r} must be a mapping of option: value")
    owned = sorted(set(sec) & set(RUN_OWNED.get(name, ())))
    if owned:
        raise SafealignError(f"{source}: section {name!r} sets {', '.join(owned)}, which the run sets itself; "
                             "remove them")
    return dict(sec)


def _modes(sec: dict, source: str) -> tuple[str, ...]:
    modes = sec.pop("modes", DEFAULT_FINETUNE_MODES)
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    known = get_args(get_type_hints(FinetuneConfig)["mode"])
    if not isinstance(modes, (list, tuple)) or not modes:
        raise SafealignError(f"{source}: finetune section's 'modes' must be a non-empty list, e.g. "
                             "[modular, sequential]")
    bad = [str(m) for m in modes if m not in known]
    if bad or len(set(modes)) != len(modes):
        raise SafealignError(f"{source}: finetune section's 'modes' must list distinct modes of "
                             f"{', '.join(known)}; got {', '.join(map(str, modes))}")
    return tuple(modes)


def _per_mode(sec: dict, modes: tuple[str, ...], source: str) -> dict[str, dict]:
    per_mode = sec.pop("per_mode", None) or {}
    names = {f.name for f in dataclasses.fields(FinetuneConfig)} - set(RUN_OWNED["finetune"])
    if not isinstance(per_mode, Mapping) or not all(m in modes and isinstance(o, Mapping)
                                                    for m, o in per_mode.items()):
        raise SafealignError(f"{source}: finetune section's 'per_mode' must map modes listed in 'modes' to "
                             "finetune options, e.g. per_mode: {full: {learning_rate: 1.0e-4}}")
    for m, opts in per_mode.items():
        bad = sorted(set(opts) - names - set(getattr(FinetuneConfig, "RENAMED", {})))
        if bad:
            raise SafealignError(f"{source}: finetune section's per_mode.{m} has unknown option(s) "
                                 f"{', '.join(bad)}")
    return {m: dict(o) for m, o in per_mode.items()}


def _finetunes(top: dict, sec: dict, task: Path, safety: Path, out: Path, source: str) -> dict[str, FinetuneConfig]:
    modes = _modes(sec, source)
    per_mode = _per_mode(sec, modes, source)
    return {m: from_dict(FinetuneConfig, {**top, **sec, **per_mode.get(m, {}), "mode": m, "data": str(task),
                                          "safety": str(safety), "output": str(out / f"task-{m}"),
                                          "resume": True, "overwrite": True}, source="finetune section")
            for m in modes}


def run_config_from_dict(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Validate a run config mapping and build every stage's config from it."""
    unknown = sorted(set(data) - set(TOP) - set(SECTIONS))
    if unknown:
        raise SafealignError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(TOP + SECTIONS)}")
    s = from_dict(RunSettings, {k: data[k] for k in TOP if data.get(k) is not None}, source=source)
    if not s.output:
        raise SafealignError(f"{source}: 'output' (the run folder) is required")
    sec = {name: _section(data, name, source) for name in SECTIONS}
    out = Path(s.output)
    top = {"model": s.model, "seed": s.seed}
    cats = {"categories": s.categories}
    prompts_file, dataset, experts, safety = out / "prompts.parquet", out / "dataset", out / "experts", out / "safety"
    task = from_dict(TaskConfig, sec["task"], source="task section")
    if not task.data and plugin_for_model(s.model) is None:
        raise SafealignError(f"{source}: section 'task' needs 'data' (a captioned image folder) for a model "
                             "without a plugin")
    task_dir = Path(task.data) if task.data else out / "task-data"
    finetune = _finetunes(top, sec["finetune"], task_dir, safety, out, source)
    audit_base = {**top, **cats, **sec["audit"], "safety": str(safety)}
    if all(m == "full" for m in finetune):  # no LoRA to audit: the section is still checked now, not never
        from_dict(AuditConfig, {**audit_base, "lora": str(safety)}, source="audit section")
    return RunConfig(
        model=s.model, output=s.output, seed=s.seed, categories=s.categories,
        prompts=from_dict(PromptsConfig, {**top, **cats, **sec["prompts"], "output": str(prompts_file),
                                          "overwrite": True}, source="prompts section"),
        dataset=from_dict(ImagesConfig, {"model": s.model, **cats, **sec["dataset"], "prompts": str(prompts_file),
                                         "output": str(dataset), "overwrite": True}, source="dataset section"),
        experts=from_dict(ExpertConfig, {**top, **sec["experts"], "dataset": str(dataset), "output": str(experts),
                                         "resume": True, "overwrite": True, "category": "all"},
                          source="experts section"),
        merge=from_dict(MergeConfig, {**top, "dataset": str(dataset), **sec["merge"], "experts": (str(experts),),
                                      "output": str(safety), "overwrite": True}, source="merge section"),
        evaluate=from_dict(EvaluateConfig, {**top, **cats, **sec["evaluate"], "lora": (f"aligned={safety}",),
                                            "output": str(out / "report"), "overwrite": True},
                           source="evaluate section"),
        task=task,
        finetune=finetune,
        audit={m: from_dict(AuditConfig, {**audit_base, "lora": cfg.output}, source="audit section")
               for m, cfg in finetune.items() if m != "full"},  # a full fine-tune is a new model, not a LoRA
        raw=dict(data),
    )


def packaged_configs() -> list[str]:
    """Names of the run configs shipped in the package (``safealign run NAME``)."""
    root = resources.files("safealign") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")
                  and not p.name.startswith("taxonomy"))


def packaged_config(name: str) -> Path:
    """The file of a packaged run config (``world``, ``sd15``, ``sdxl``)."""
    if name not in packaged_configs():
        raise SafealignError(f"no packaged run config named {name!r}; known: {', '.join(packaged_configs())}")
    return Path(str(resources.files("safealign") / "configs" / f"{name}.yaml"))


def resolve_config(spec: str | os.PathLike) -> Path:
    """A run config file: ``spec`` itself when it is a file, else the packaged config of that name."""
    p = Path(spec)
    if p.is_file():
        return p
    if str(spec) in packaged_configs():
        return packaged_config(str(spec))
    raise SafealignError(f"config file {p} does not exist; give a YAML file or a packaged config's name "
                         f"({', '.join(packaged_configs())})")


def load_run_config(spec: str | os.PathLike) -> RunConfig:
    """Read and validate a run config (a YAML file, or a packaged config's name)."""
    path = resolve_config(spec)
    return run_config_from_dict(load_yaml(path), source=str(spec))
