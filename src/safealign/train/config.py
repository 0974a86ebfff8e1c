"""Training configs: what every trainer shares, the Diffusion-DPO expert, the task fine-tune."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

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
    lora_init: Literal["gaussian", "default"] = field(
        "gaussian", "LoRA A initialisation: gaussian (peft's init_lora_weights='gaussian', normal with std 1/r, as the "
                    "official release) or default (peft's Kaiming-uniform); B starts at zero either way")
    learning_rate: float = field(1e-4, "peak learning rate")
    scale_lr: bool = field(False, "multiply --learning-rate by processes x --batch-size x "
                                  "--gradient-accumulation-steps (the official release's --scale_lr)")
    optimizer: Literal["adamw", "adafactor"] = field(
        "adamw", "optimiser: adamw (torch) or adafactor (transformers' Adafactor with a fixed learning rate: "
                 "scale_parameter=False, relative_step=False, warmup_init=False, its update clipped at RMS 1.0)")
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
        if not self.learning_rate > 0:
            raise SafealignError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise SafealignError("--warmup-steps and --checkpoint-every must be >= 0, --keep-checkpoints >= 1")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Ranges of the LoRA, optimiser and resolution options (comparisons written so that NaN fails them)."""
        if not 0 < self.alpha < float("inf"):
            raise SafealignError(f"--alpha must be > 0 (scale = alpha / rank), got {self.alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SafealignError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise SafealignError(f"--adam-beta1 and --adam-beta2 must be in [0, 1), got {self.adam_beta1}, "
                                 f"{self.adam_beta2}")
        if not self.adam_epsilon > 0 or not self.weight_decay >= 0 or not self.max_grad_norm >= 0:
            raise SafealignError("--adam-epsilon must be > 0, --weight-decay and --max-grad-norm >= 0")
        if self.resolution and (self.resolution < 8 or self.resolution % 8):
            raise SafealignError(f"--resolution must be 0 (the model's own) or a multiple of 8 that is >= 8, got "
                                 f"{self.resolution}")
        if self.log_every < 1 or self.seed < 0:
            raise SafealignError(f"--log-every must be >= 1 and --seed >= 0, got {self.log_every}, {self.seed}")


@dataclasses.dataclass(frozen=True)
class ExpertConfig(SamplingFields, TrainConfig):
    """Diffusion-DPO safety expert(s): prefer the safe image over the unsafe one under the unsafe prompt.

    ``steps`` and ``guidance`` are the validation sampler's (None: the model's defaults)."""

    RENAMED = {"num_inference_steps": "steps", "guidance_scale": "guidance"}

    def __new__(cls, *args: Any, **kwargs: Any) -> ExpertConfig:
        # The options given by name are the ones set explicitly: a --recipe fills only the others. (A frozen
        # dataclass's __post_init__ cannot tell "given" from "left at its default"; __new__ sees the arguments.)
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        object.__setattr__(self, "_explicit", frozenset(names[:len(args)]) | frozenset(kwargs))
        return self

    recipe: Literal["safealign", "alignguard"] = field(
        "safealign", "training recipe: safealign (ours: these options' defaults) or alignguard (the paper's, as "
                     "the official SafetyDPO release trains: learning rate, warm-up, optimiser, clipping, empty "
                     "prompts, steps, batch, resolution and LoRA for the model's family); options set explicitly "
                     "win and are recorded in the expert's manifest")
    empty_prompt_fraction: float = field(0.0, "share of training pairs whose unsafe prompt is replaced by the "
                                              "empty prompt at each step, drawn from --seed (official: 0.2)")
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
        self._apply_recipe()
        super().__post_init__()
        if not 0.0 <= self.empty_prompt_fraction < 1.0:
            raise SafealignError(f"--empty-prompt-fraction must be in [0, 1), got {self.empty_prompt_fraction}")
        if not self.dataset:
            raise SafealignError("--dataset is required")
        if not self.category:
            raise SafealignError("--category is required (a category name, or 'all')")
        if not 0 < self.beta < float("inf"):
            raise SafealignError(f"--beta must be > 0, got {self.beta}")
        if not self.preserve_weight >= 0:
            raise SafealignError(f"--preserve-weight must be >= 0, got {self.preserve_weight}")
        if not self.text_preserve_weight >= 0:
            raise SafealignError(f"--text-preserve-weight must be >= 0, got {self.text_preserve_weight}")
        self.sampling  # noqa: B018 - validates --steps and --guidance
        if self.validate_every < 0 or self.validation_prompts < 1 or self.validation_seeds < 1:
            raise SafealignError("--validate-every must be >= 0, --validation-prompts and --validation-seeds >= 1")
        if self.validate_every and not self.judge:
            raise SafealignError("--validate-every needs a --judge ('world' or 'package.module:callable')")

    def _apply_recipe(self) -> None:
        from .recipes import model_family, recipe_values
        family = ""
        if self.recipe != "safealign":
            try:
                family = model_family(self.model)
            except SafealignError:  # the model is not there yet: resolved() fills the recipe when training starts
                object.__setattr__(self, "_recipe", (None, {}))
                return
        values = recipe_values(self.recipe, family)
        explicit = getattr(self, "_explicit", frozenset())
        for name, value in values.items():
            if name not in explicit:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "_recipe", (family, values))

    def resolved(self) -> ExpertConfig:
        """This config with its recipe filled in (a no-op unless the model was unreadable when it was built; then
        reading it now fails with the model's own error)."""
        if getattr(self, "_recipe", ("", {}))[0] is not None:
            return self
        from .recipes import model_family
        model_family(self.model)
        return type(self)(**{k: getattr(self, k) for k in getattr(self, "_explicit", ())})

    @property
    def recipe_values(self) -> dict[str, Any]:
        """The values the recipe set for this model's family (``{}`` for ``safealign``: the defaults)."""
        return dict(getattr(self, "_recipe", ("", {}))[1])

    @property
    def recipe_overrides(self) -> dict[str, dict[str, Any]]:
        """Options set explicitly to something other than the recipe's value: ``{name: {recipe, used}}``."""
        return {k: {"recipe": v, "used": getattr(self, k)} for k, v in self.recipe_values.items()
                if getattr(self, k) != v}

    def recipe_record(self) -> dict[str, Any]:
        """What an expert's manifest records about the recipe."""
        family, values = getattr(self, "_recipe", ("", {}))
        return {"name": self.recipe, "family": family or None, "values": {k: (list(v) if isinstance(v, tuple) else v)
                                                                          for k, v in values.items()},
                "overrides": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in d.items()}
                              for k, d in self.recipe_overrides.items()}}


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
