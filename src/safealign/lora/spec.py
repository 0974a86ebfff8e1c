"""The shape of a LoRA (rank, alpha, targets, per-module patterns) and attaching it to a UNet through peft."""

from __future__ import annotations

import math
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
        if not _is_rank(self.rank):
            raise SafealignError(f"LoRA rank must be a whole number >= 1, got {self.rank!r}")
        if not _is_number(self.alpha) or not self.alpha > 0:
            raise SafealignError(f"LoRA alpha must be a finite number > 0 (scale = alpha / rank), got {self.alpha!r}")
        object.__setattr__(self, "rank", int(self.rank))  # 4.0 from a JSON header is rank 4
        object.__setattr__(self, "alpha", float(self.alpha))
        if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
            raise SafealignError("LoRA targets must be module names such as to_q,to_k,to_v,to_out.0, got "
                                 f"{list(self.targets)!r:.80}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise SafealignError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        for name, pattern, ok in (("rank_pattern", self.rank_pattern, _is_rank),
                                  ("alpha_pattern", self.alpha_pattern, lambda v: _is_number(v) and v > 0)):
            if not isinstance(pattern, dict):
                raise SafealignError(f"LoRA {name} must be a mapping of module pattern: value, got "
                                     f"{type(pattern).__name__}")
            for key, v in pattern.items():
                if not isinstance(key, str) or not ok(v):
                    raise SafealignError(f"LoRA {name} entry {key!r}: {v!r} is not valid (a module pattern and a "
                                         "number > 0)")
                try:
                    re.compile(key)
                except re.error as e:
                    raise SafealignError(f"LoRA {name} key {key!r} is not a valid pattern ({e})") from None

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
    def from_metadata(cls, md: dict, source: str = "LoRA header") -> LoraSpec:
        """The spec a LoraConfig dict (peft's / diffusers' ``lora_adapter_metadata``) describes; a missing or
        malformed entry is a one-line error naming it."""
        if not isinstance(md, dict):
            raise SafealignError(f"{source}: the LoRA config must be a JSON object, got {type(md).__name__}")
        if "r" not in md:
            raise SafealignError(f"{source}: the LoRA config has no 'r' (rank); the header is damaged -- re-save the "
                                 "file, or remove its lora_adapter_metadata to infer the rank from the tensors")
        targets = md.get("target_modules")
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            raise SafealignError(f"{source}: the LoRA config's target_modules must be a non-empty list of module "
                                 f"names, got {targets!r:.80}")
        try:
            return cls(rank=md["r"], alpha=md.get("lora_alpha", md["r"]), targets=tuple(targets),
                       dropout=md.get("lora_dropout", 0.0), rank_pattern=md.get("rank_pattern") or {},
                       alpha_pattern=md.get("alpha_pattern") or {})
        except SafealignError as e:
            raise SafealignError(f"{source}: {e}") from None

    def rank_for(self, module: str) -> int:
        """The rank of one module, honouring rank_pattern."""
        return int(_pattern_value(self.rank_pattern, module, self.rank))

    def scale_for(self, module: str) -> float:
        """alpha/r for one module, honouring rank_pattern / alpha_pattern (peft's suffix-match rule)."""
        r = _pattern_value(self.rank_pattern, module, self.rank)
        a = _pattern_value(self.alpha_pattern, module, self.alpha)
        return float(a) / float(r)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v: object) -> bool:
    return _is_number(v) and float(v).is_integer() and v >= 1  # type: ignore[operator]


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
