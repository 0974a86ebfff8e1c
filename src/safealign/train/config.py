"""Training configs: what every trainer shares, the Diffusion-DPO expert, the task fine-tune."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..configuration import field
from ..errors import SafealignError
from ..sampling import SamplingFields


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
class ExpertConfig(SamplingFields, TrainConfig):
    """Diffusion-DPO safety expert(s): prefer the safe image over the unsafe one under the unsafe prompt.

    ``steps`` and ``guidance`` are the validation sampler's (None: the model's defaults)."""

    RENAMED = {"num_inference_steps": "steps", "guidance_scale": "guidance"}

    dataset: str = field("", "paired dataset folder")
    category: str = field("", "category to train, 'all' (one expert per category) or 'pooled' (one expert on "
                              "every category's pairs)")
    beta: float = field(5000.0, "Diffusion-DPO beta (official release: 5000)")
    preserve_weight: float = field(0.0, "weight of the preservation term: under each pair's safe prompt the expert's "
                                        "prediction stays the base model's (0: plain Diffusion-DPO; on, each "
                                        "step runs a third image through both networks)")
    preserve_from: Literal["category", "all", "prompts", "both"] = field(
        "category", "where the preservation term holds the model still: under the safe prompts of the expert's own "
                    "category's pairs, of every category's pairs, under --preserve-prompts (anchor prompts of "
                    "ordinary content; a model plugin such as the mini world has its own), or both: half the batch "
                    "under the pairs' own safe prompts, half under anchor prompts")
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
