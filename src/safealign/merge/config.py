"""The merge config: which experts, which method, how Co-Merge calibrates."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from ..configuration import field
from ..errors import SafealignError


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Merge LoRA safety experts into one LoRA (Co-Merge or a baseline), for any subset of categories."""

    experts: tuple[str, ...] = field((), "expert folders, or one folder holding expert folders (comma list)")
    output: str = field("", "output folder for the merged LoRA")
    overwrite: bool = field(False, "replace an existing output folder")
    allow_partial: bool = field(False, "merge a folder of experts although some of its training run's categories "
                                       "are unfinished (missing or without a finished safealign.json); the merged "
                                       "manifest names the missing ones")
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
        if self.weights and not (all(0 <= w < math.inf for w in self.weights) and any(self.weights)):
            raise SafealignError(f"--weights must be finite numbers >= 0, not all 0, got "
                                 f"{','.join(map(str, self.weights))}")
