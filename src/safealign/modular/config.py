"""Configs of the Modular LoRA side: compose adapters, audit a LoRA."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..configuration import field
from ..errors import SafealignError


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
