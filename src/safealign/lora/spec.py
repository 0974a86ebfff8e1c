"""The shape of a LoRA (rank, alpha, targets, per-module patterns) and attaching it to a UNet through peft."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import SafealignError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA shape: rank ``r``, ``alpha`` (scale = alpha / r), target module names, dropout."""

    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise SafealignError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise SafealignError("LoRA targets are empty; name modules such as to_q,to_k,to_v,to_out.0")
        if not 0.0 <= self.dropout < 1.0:
            raise SafealignError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self):
        from peft import LoraConfig
        return LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha), target_modules=list(self.targets),
                          lora_dropout=float(self.dropout), init_lora_weights="gaussian",
                          rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern))

    def metadata(self) -> dict:
        """LoraConfig kwargs diffusers rebuilds the adapter from (``LoraConfig(**metadata)``)."""
        return {"r": int(self.rank), "lora_alpha": float(self.alpha), "target_modules": sorted(self.targets),
                "lora_dropout": float(self.dropout), "bias": "none", "use_dora": False,
                "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
                "init_lora_weights": True}

    @classmethod
    def from_metadata(cls, md: dict) -> LoraSpec:
        return cls(rank=int(md["r"]), alpha=float(md.get("lora_alpha", md["r"])),
                   targets=tuple(md["target_modules"]), dropout=float(md.get("lora_dropout", 0.0)),
                   rank_pattern=dict(md.get("rank_pattern") or {}), alpha_pattern=dict(md.get("alpha_pattern") or {}))

    def scale_for(self, module: str) -> float:
        """alpha/r for one module, honouring rank_pattern / alpha_pattern (peft's suffix-match rule)."""
        r = _pattern_value(self.rank_pattern, module, self.rank)
        a = _pattern_value(self.alpha_pattern, module, self.alpha)
        return float(a) / float(r)


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    for key, v in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def target_module_names(model: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of Linear/Conv modules of ``model`` matched by the target suffixes (peft's rule)."""
    names = []
    for name, mod in model.named_modules():
        if "lora_" in name or name.endswith(".base_layer"):
            continue
        base = getattr(mod, "base_layer", mod)  # a module peft already wrapped still counts
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def add_lora(unet: torch.nn.Module, spec: LoraSpec, adapter_name: str = "default") -> None:
    """Attach a trainable LoRA adapter (base weights stay frozen)."""
    missing = [t for t in spec.targets if not target_module_names(unet, (t,))]
    if missing:
        raise SafealignError(f"LoRA target(s) {', '.join(missing)} match no Linear/Conv module of the UNet; "
                             "use names such as to_q,to_k,to_v,to_out.0")
    unet.add_adapter(spec.peft_config(), adapter_name=adapter_name)


def lora_state_dict(unet: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's adapter-free keys (``<module>.lora_A.weight``), detached, on CPU."""
    from peft.utils import get_peft_model_state_dict
    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
