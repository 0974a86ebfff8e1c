"""Named training recipes for Diffusion-DPO experts: ``safealign`` (ours: the option defaults) and ``alignguard``
(the paper's, as the official SafetyDPO release trains it).

A recipe is a table of option values per model family. ``--recipe alignguard`` fills every option the user did
not set with the release's value for the model's family; an option the user sets explicitly wins, and the
difference is recorded (``ExpertConfig.recipe_overrides``, the expert's manifest, the training log).

Where each ``alignguard`` value comes from (SafetyDPO ``launchers/train_lora_sd15.sh``, ``train_lora_sdxl.sh`` and
``train.py``):

- SD 1.x/2.x: ``--learning_rate=1e-5 --scale_lr`` (the rate times processes x batch x accumulation, so 1.6e-4 on
  one GPU at batch 4 x accumulation 4), ``--lr_scheduler=constant_with_warmup --lr_warmup_steps=500``, AdamW
  (train.py's defaults: betas 0.9/0.999, eps 1e-8, weight decay 1e-2), ``clip_grad_norm_`` at 1.0,
  ``--proportion_empty_prompts`` 0.2 (train.py's default), ``--max_train_steps=2000``, ``--train_batch_size=4
  --gradient_accumulation_steps=4``, the resolution 512 (train.py's default outside SDXL: SD1.5's native one),
  ``--beta_dpo 5000``, ``LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
  target_modules=[to_k, to_q, to_v, to_out.0])``.
- SDXL: the same, except ``--learning_rate=1e-5`` without ``--scale_lr``, ``--lr_warmup_steps=0``, 1024 px,
  transformers' ``Adafactor(lr, weight_decay=1e-2, clip_threshold=1.0, scale_parameter=False,
  relative_step=False)`` (warmup_init keeps its default, False) and gradient checkpointing (train.py turns both on
  for ``--sdxl``); train.py skips ``clip_grad_norm_`` when Adafactor is used (Adafactor clips its own update at
  RMS 1.0), hence ``max_grad_norm`` 0.

Not in the table, on purpose: ``mixed_precision`` (the release trains in fp16 on GPUs; a CPU cannot, so the run
configs set it), seeds (the release leaves them unset), checkpoint cadence (operational).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SafealignError

RECIPES = ("safealign", "alignguard")

_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

_ALIGNGUARD_SD: dict[str, Any] = {
    "learning_rate": 1e-5, "scale_lr": True, "warmup_steps": 500, "lr_scheduler": "constant",
    "optimizer": "adamw", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 1e-2,
    "max_grad_norm": 1.0, "empty_prompt_fraction": 0.2, "max_steps": 2000, "batch_size": 4,
    "gradient_accumulation_steps": 4, "gradient_checkpointing": False, "beta": 5000.0,
    "rank": 4, "alpha": 4.0, "targets": _TARGETS, "lora_init": "gaussian", "lora_dropout": 0.0,
}
_ALIGNGUARD_SDXL: dict[str, Any] = {
    **_ALIGNGUARD_SD, "scale_lr": False, "warmup_steps": 0, "optimizer": "adafactor", "max_grad_norm": 0.0,
    "gradient_checkpointing": True,
}
#: the release's resolution per family (its default: 1024 with --sdxl, else 512)
_ALIGNGUARD_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def recipe_values(name: str, family: str) -> dict[str, Any]:
    """The option values recipe ``name`` sets for a model of ``family`` (``sd1``, ``sd2`` or ``sdxl``)."""
    if name == "safealign":
        return {}  # ours: the options' own defaults
    if name != "alignguard":
        raise SafealignError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    table = _ALIGNGUARD_SDXL if family == "sdxl" else _ALIGNGUARD_SD
    return {**table, "resolution": _ALIGNGUARD_RESOLUTION[family]}


def _read_json(path: str, local: bool, name: str) -> dict:
    if local:
        f = Path(path) / name
        return json.loads(f.read_text()) if f.is_file() else {}
    from huggingface_hub import try_to_load_from_cache  # the local cache only; never downloads
    try:
        f = try_to_load_from_cache(path, name)
    except Exception:  # noqa: BLE001 - a malformed id is "not cached" too
        f = None
    return json.loads(Path(f).read_text()) if isinstance(f, str) else {}


def model_family(model: str) -> str:
    """The family (``sd1``, ``sd2``, ``sdxl``) of ``model`` from its config files alone (no weights loaded)."""
    from ..backbone import _read_model_index, detect_family, resolve_model
    path, local = resolve_model(model)
    index = _read_model_index(path, local)
    return detect_family(index, _read_json(path, local, "unet/config.json"))
