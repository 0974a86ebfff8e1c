"""Frozen, validated configuration dataclasses and their (de)serialisation.

Each stage has one config dataclass. Field help lives in ``metadata={"help": ...}``; the CLI builds its options
from the fields, and ``--config x.yaml`` supplies any of them (command-line flags win).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .errors import SafealignError


def field(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a config dataclass (tuples become lists, paths strings)."""
    def conv(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        return v
    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# options that change how a run is carried out, not what it computes
OPERATIONAL = ("resume", "overwrite", "cache_dir", "log_with", "log_every")


def config_hash(cfg: Any) -> str:
    """Hash of what determines the result (operational options such as --resume excluded)."""
    from .utils import sha256_text
    d = {k: v for k, v in to_dict(cfg).items() if k not in OPERATIONAL}
    return sha256_text(json.dumps(d, sort_keys=True))[:16]


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SafealignError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SafealignError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SafealignError(f"config file {p} must hold a mapping of option: value")
    return data


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if value is None:
        return None
    if origin is Literal:
        if value not in get_args(tp):
            raise SafealignError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, get_args(tp)))}, "
                                 f"got {value!r}")
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(value)
    args = [a for a in get_args(tp) if a is not type(None)]
    base = args[0] if args and origin is not None else tp
    if get_origin(base) is Literal:
        return _coerce(name, base, value)
    if get_origin(base) in (tuple, list):
        return _coerce(name, base, value)
    try:
        if base is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base in (int, float, str, bool):
            return base(value)
    except (TypeError, ValueError):
        raise SafealignError(f"--{name.replace('_', '-')} expects {base.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type, data: dict, *, source: str = "config") -> Any:
    """Build ``cls`` from a dict, coercing types; unknown keys are an error naming them."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SafealignError(f"{source} has unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
    kw = {k: _coerce(k, hints[k], v) for k, v in data.items()}
    return cls(**kw)


def add_arguments(parser: Any, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--option`` per dataclass field (defaults left as None so YAML and defaults can apply)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, "") else "")
        args = [a for a in get_args(tp) if a is not type(None)]
        is_bool = tp is bool or (args and args[0] is bool and len(args) == 1)
        if is_bool:
            parser.add_argument(flag, dest=f.name, default=None, action="store_true", help=help_text)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help="disable " + flag)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text,
                                metavar=f.metadata.get("metavar", f.name.upper()))


def build(cls: type, args: Any, extra: dict | None = None) -> Any:
    """Config from defaults < ``--config`` YAML < explicit flags < ``extra``."""
    data: dict = {}
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        data.update(load_yaml(cfg_path))
    names = {f.name for f in dataclasses.fields(cls)}
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            data[n] = v
    data.update(extra or {})
    return from_dict(cls, data, source=str(cfg_path) if cfg_path else "command line")


# ---------------------------------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What every trainer shares (optimiser, schedule, checkpoints, devices, logging)."""

    model: str = field("world", "diffusers pipeline folder, cached hub id, or 'world'")
    output: str = field("", "output folder")
    overwrite: bool = field(False, "replace an existing output folder")
    rank: int = field(4, "LoRA rank r")
    alpha: float = field(4.0, "LoRA alpha (scale = alpha / r)")
    targets: tuple[str, ...] = field(("to_q", "to_k", "to_v", "to_out.0"), "LoRA target modules (comma list)")
    lora_dropout: float = field(0.0, "LoRA dropout")
    learning_rate: float = field(1e-4, "peak learning rate")
    optimizer: Literal["adamw", "adafactor"] = field("adamw", "optimiser")
    adam_beta1: float = field(0.9, "AdamW beta1")
    adam_beta2: float = field(0.999, "AdamW beta2")
    adam_epsilon: float = field(1e-8, "AdamW epsilon")
    weight_decay: float = field(1e-2, "weight decay")
    batch_size: int = field(4, "examples per process per micro-step")
    gradient_accumulation_steps: int = field(1, "micro-steps per optimiser step")
    max_steps: int = field(500, "optimiser steps")
    warmup_steps: int = field(0, "linear warm-up steps")
    lr_scheduler: Literal["constant", "linear", "cosine"] = field("constant", "schedule after warm-up")
    max_grad_norm: float = field(1.0, "gradient clipping norm (0 disables)")
    checkpoint_every: int = field(100, "save a resumable checkpoint every N steps (0: never)")
    keep_checkpoints: int = field(2, "how many recent checkpoints to keep")
    resume: bool = field(False, "resume from the latest checkpoint in <output>.partial")
    seed: int = field(0, "seed of every random choice (batches, noise, timesteps)")
    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", "mixed precision (GPU)")
    gradient_checkpointing: bool = field(False, "trade compute for memory in the UNet")
    resolution: int = field(0, "training resolution in pixels (0: the model's native one)")
    cache_dir: str = field("", "where latents/text embeddings are cached (default ~/.cache/safealign)")
    log_with: Literal["", "tensorboard"] = field("", "experiment tracker through Accelerate")
    log_every: int = field(10, "log metrics every N steps")

    def __post_init__(self) -> None:
        if not self.output:
            raise SafealignError("--output is required")
        if self.rank < 1:
            raise SafealignError(f"--rank must be >= 1, got {self.rank}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise SafealignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise SafealignError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise SafealignError("--warmup-steps and --checkpoint-every must be >= 0, --keep-checkpoints >= 1")


@dataclasses.dataclass(frozen=True)
class ExpertConfig(TrainConfig):
    """Diffusion-DPO safety expert(s): prefer the safe image over the unsafe one under the unsafe prompt."""

    dataset: str = field("", "paired dataset folder")
    category: str = field("", "category to train, 'all' (one expert per category) or 'pooled' (one expert on "
                              "every category's pairs)")
    beta: float = field(5000.0, "Diffusion-DPO beta (official release: 5000)")
    preserve_weight: float = field(0.0, "weight of the preservation term: under each pair's safe prompt the expert's "
                                        "prediction stays the base model's (0: plain Diffusion-DPO; costs 1.6x "
                                        "compute per step)")
    preserve_from: Literal["category", "all", "prompts", "both"] = field(
        "category", "where the preservation term holds the model still: under the safe prompts of the expert's own "
                    "category's pairs, of every category's pairs, under --preserve-prompts (anchor prompts of "
                    "ordinary content; the world model has its own), or both: half the batch under the pairs' own "
                    "safe prompts, half under anchor prompts")
    preserve_prompts: tuple[str, ...] = field((), "anchor prompts for --preserve-from prompts|both (comma list)")
    text_preserve_weight: float = field(0.0, "weight of the text-side preservation term: how much the LoRA on the "
                                             "cross-attention keys/values (attn2.to_k, attn2.to_v) changes them for "
                                             "the tokens of prompts that must not change (every safe prompt of the "
                                             "split, the anchor prompts, the empty prompt), relative to their size "
                                             "(0: off; costs nothing per step)")
    kv_basis: Literal["random", "hazard", "category"] = field(
        "random", "the LoRA's A on the cross-attention keys/values: random (trained); hazard: fixed to the "
                  "directions of token space where the hazard words' states are largest relative to the kept "
                  "prompts' (see --text-preserve-weight), shared by every expert of the dataset; category: each "
                  "expert's own, where its category's hazard words are largest relative to the kept prompts and "
                  "every other category's hazard words (experts that do not act on each other's words; the pooled "
                  "expert takes the shared one); only B trains")
    split: str = field("train", "dataset split to train on")
    eval_split: str = field("test", "held-out split for implicit accuracy at the end (skipped if empty)")
    validate_every: int = field(0, "sample and judge validation prompts every N steps (0: off)")
    judge: str = field("", "judge for validation: 'world' or 'package.module:callable'")
    validation_prompts: int = field(4, "unsafe prompts (and their safe twins) sampled per validation")
    validation_seeds: int = field(2, "seeds per validation prompt")
    benign_prompts: tuple[str, ...] = field((), "benign prompts to sample at validation (comma list)")
    num_inference_steps: int = field(20, "sampler steps at validation")
    guidance_scale: float = field(7.5, "classifier-free guidance at validation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset:
            raise SafealignError("--dataset is required")
        if not self.category:
            raise SafealignError("--category is required (a category name, or 'all')")
        if self.beta <= 0:
            raise SafealignError(f"--beta must be > 0, got {self.beta}")
        if self.preserve_weight < 0:
            raise SafealignError(f"--preserve-weight must be >= 0, got {self.preserve_weight}")
        if self.text_preserve_weight < 0:
            raise SafealignError(f"--text-preserve-weight must be >= 0, got {self.text_preserve_weight}")
        if self.validate_every and not self.judge:
            raise SafealignError("--validate-every needs a --judge ('world' or 'package.module:callable')")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Merge LoRA safety experts into one LoRA (Co-Merge or a baseline), for any subset of categories."""

    experts: tuple[str, ...] = field((), "expert folders, or one folder holding expert folders (comma list)")
    output: str = field("", "output folder for the merged LoRA")
    overwrite: bool = field(False, "replace an existing output folder")
    method: Literal["comerge", "cat", "linear", "task_arithmetic", "ties", "dare", "dare_ties"] = field(
        "comerge", "merge method")
    categories: tuple[str, ...] = field((), "merge only these categories' experts (comma list; default all)")
    weights: tuple[float, ...] = field((), "per-expert weights for linear/task_arithmetic/ties/dare")
    density: float = field(0.5, "TIES/DARE density (fraction kept)")
    scale: float = field(1.0, "multiply the merged update by this (a LoRA weight baked into the file)")
    model: str = field("world", "base pipeline (Co-Merge statistics run through its UNet)")
    dataset: str = field("", "paired dataset whose unsafe prompts/images calibrate Co-Merge")
    prompts: tuple[str, ...] = field((), "calibration prompts instead of a dataset (comma list)")
    split: str = field("train", "dataset split used for calibration")
    calibration_per_category: int = field(16, "calibration pairs per category (0: all)")
    timesteps: int = field(4, "timesteps per calibration input")
    granularity: Literal["output", "rank"] = field("output", "Co-Merge unit: output neuron or rank component")
    activations: Literal["shared", "per-expert"] = field("shared", "hidden states: one base forward or each expert's")
    reuse_stats: str = field("", "a previous Co-Merge folder whose stored statistics are reused where they match")
    batch_size: int = field(8, "calibration batch size")
    seed: int = field(0, "seed of calibration noise and DARE")
    cache_dir: str = field("", "latent/text cache (default ~/.cache/safealign)")

    def __post_init__(self) -> None:
        if not self.output:
            raise SafealignError("--output is required")
        if not self.experts:
            raise SafealignError("--experts is required (expert folders, or the folder holding them)")
        if not 0.0 < self.density <= 1.0:
            raise SafealignError(f"--density must be in (0, 1], got {self.density}")
        if self.timesteps < 1:
            raise SafealignError(f"--timesteps must be >= 1, got {self.timesteps}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise SafealignError(f"--scale must be a positive number, got {self.scale}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Task fine-tuning (plain diffusion loss) in the three modes Modular LoRA compares."""

    data: str = field("", "captioned images: a folder with metadata.jsonl (file_name, text) or .txt sidecars, "
                          "or a parquet file with image and text columns")
    mode: Literal["modular", "sequential", "full"] = field(
        "modular", "modular: task LoRA on the clean base; sequential: task LoRA on base+safety fused; "
                   "full: full fine-tune of the safety-fused UNet")
    safety: str = field("", "the safety LoRA (required for sequential/full; recorded for modular)")
    learning_rate: float = field(1e-4, "peak learning rate")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise SafealignError("--data is required (captioned image folder or parquet file)")
        if self.mode in ("sequential", "full") and not self.safety:
            raise SafealignError(f"--mode {self.mode} needs --safety (the safety LoRA to fuse before training)")


@dataclasses.dataclass(frozen=True)
class ComposeConfig:
    """Base + frozen safety LoRA + task LoRA(s) -> one LoRA file or a fused pipeline folder."""

    model: str = field("world", "base pipeline folder, cached hub id, or 'world'")
    safety: str = field("", "safety LoRA folder/file")
    tasks: tuple[str, ...] = field((), "task LoRAs, each PATH or PATH:WEIGHT (comma list)")
    safety_weight: float = field(1.0, "scale of the safety LoRA")
    output: str = field("", "output folder")
    format: Literal["lora", "pipeline"] = field("lora", "one exact LoRA (sum of all) or a fused pipeline folder")
    overwrite: bool = field(False, "replace an existing output folder")

    def __post_init__(self) -> None:
        if not self.output:
            raise SafealignError("--output is required")
        if not self.safety and not self.tasks:
            raise SafealignError("nothing to compose: pass --safety and/or --tasks")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """Does a third-party LoRA bring unsafe concepts back? IP of base+safety against base+safety+LoRA."""

    model: str = field("world", "base pipeline folder, cached hub id, or 'world'")
    safety: str = field("", "the safety LoRA the deployment enforces")
    lora: str = field("", "the LoRA under audit")
    lora_weight: float = field(1.0, "scale the audited LoRA is used at")
    judge: str = field("", "judge: 'world' (default for --model world) or 'package.module:callable'")
    prompts: str = field("", "CSV/parquet with prompt and category columns (default for the world: built in)")
    categories: tuple[str, ...] = field((), "audit only these categories (comma list)")
    prompts_per_category: int = field(16, "prompts sampled per category (world prompts)")
    seeds: int = field(2, "seeds per prompt")
    threshold: float = field(0.05, "flag a category whose IP rises by more than this (absolute)")
    alpha: float = field(0.05, "... and whose rise has sign-test p below this (paired images; 1 = no test)")
    num_inference_steps: int = field(0, "sampler steps (0: the model's default; 20 for non-world models)")
    guidance_scale: float = field(0.0, "classifier-free guidance (0: the model's default; 7.5 for non-world)")
    seed: int = field(0, "seed of prompt sampling")
    report: str = field("", "also write the result as JSON to this file")

    def __post_init__(self) -> None:
        if not self.safety or not self.lora:
            raise SafealignError("--safety and --lora are both required")
        if self.threshold < 0:
            raise SafealignError(f"--threshold must be >= 0, got {self.threshold}")
        if not 0 < self.alpha <= 1:
            raise SafealignError(f"--alpha must be in (0, 1], got {self.alpha}")
