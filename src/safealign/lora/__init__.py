"""LoRA state dicts: add to a UNet, save/load in diffusers' format with metadata, validate, export to kohya.

On disk (diffusers' convention): ``pytorch_lora_weights.safetensors`` with keys ``unet.<module>.lora_A.weight`` /
``lora_B.weight`` and the LoraConfig as JSON in the safetensors header under ``lora_adapter_metadata``
(keys prefixed ``unet.``). Without that header diffusers infers the rank from the shapes and silently loses
``lora_alpha``, so every file we write carries it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import SafealignError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
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
    def from_metadata(cls, md: dict) -> "LoraSpec":
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


# -- in-memory ------------------------------------------------------------------------------------------------

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


def lora_modules(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) from a peft-keyed state dict."""
    out: dict[str, list] = {}
    for k, v in sd.items():
        m = re.match(r"(.+)\.lora_([AB])\.weight$", k)
        if not m:
            raise SafealignError(f"unexpected key {k!r} in a LoRA state dict (expected <module>.lora_A/B.weight)")
        out.setdefault(m.group(1), [None, None])["AB".index(m.group(2))] = v
    for mod, (a, b) in out.items():
        if a is None or b is None:
            raise SafealignError(f"LoRA module {mod} has only one of lora_A/lora_B; the file is incomplete")
    return {k: (a, b) for k, (a, b) in out.items()}


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """dW = scale * B @ A for Linear (and 1x1 Conv) LoRA factors."""
    return scale * (b.flatten(1).float() @ a.flatten(1).float())


# -- validation -------------------------------------------------------------------------------------------------

def validate_state_dict(sd: dict[str, torch.Tensor], source: str = "LoRA") -> None:
    """Pairs complete, ranks consistent, values finite."""
    if not sd:
        raise SafealignError(f"{source} holds no LoRA weights")
    for mod, (a, b) in lora_modules(sd).items():
        if a.shape[0] != b.shape[1]:
            raise SafealignError(f"{source}: {mod} has lora_A rank {a.shape[0]} but lora_B rank {b.shape[1]}")
        for n, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t).all():
                raise SafealignError(f"{source}: {mod}.{n} contains NaN or Inf; the file is damaged or training "
                                     "diverged")


def validate_for_model(sd: dict[str, torch.Tensor], unet: torch.nn.Module, source: str = "LoRA") -> None:
    """Every LoRA module exists in ``unet`` with matching in/out features."""
    mods = dict(unet.named_modules())
    for mod, (a, b) in lora_modules(sd).items():
        base = mods.get(mod)
        base = getattr(base, "base_layer", base)
        if base is None:
            raise SafealignError(f"{source}: module {mod} does not exist in this model; the LoRA was made for "
                                 "another architecture")
        w = base.weight
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise SafealignError(f"{source}: {mod} expects weight {tuple(w.shape)} but the LoRA is "
                                 f"{tuple(b.shape[:1])}x{tuple(a.shape[1:2])}; made for another model")


# -- disk -------------------------------------------------------------------------------------------------------

def save_lora(folder: str | os.PathLike, sd: dict[str, torch.Tensor], spec: LoraSpec,
              weight_name: str = WEIGHT_NAME, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/weight_name`` in diffusers' format (keys ``unet.*``, LoraConfig in the header)."""
    validate_state_dict(sd)
    tensors = {f"unet.{k}": (v.to(dtype) if dtype else v).contiguous() for k, v in sd.items()}
    md = {f"unet.{k}": v for k, v in spec.metadata().items()}
    path = Path(folder) / weight_name
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(md, sort_keys=True)})
    return path


def _resolve_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHT_NAME
    if not p.is_file():
        raise SafealignError(f"LoRA file {p} does not exist; pass a LoRA folder or its .safetensors file")
    if p.suffix != ".safetensors":
        raise SafealignError(f"{p} is not a .safetensors file; safealign never unpickles weights — convert it to "
                             "safetensors first")
    return p


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraSpec]:
    """Read a diffusers-format LoRA file or folder -> (peft-keyed UNet state dict, spec)."""
    p = _resolve_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SafealignError(f"{p} is not a readable safetensors file ({e})") from None
    unet_sd = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    if not unet_sd:
        raise SafealignError(f"{p} has no UNet LoRA weights (keys 'unet.*'); is it a kohya file? "
                             "load it with diffusers and re-save, or export from safealign")
    validate_state_dict(unet_sd, source=str(p))
    raw = header.get(METADATA_KEY)
    if raw:
        md = {k[len("unet."):]: v for k, v in json.loads(raw).items() if k.startswith("unet.")}
        spec = LoraSpec.from_metadata(md)
    else:  # no header: rank from shapes, alpha = rank (what diffusers assumes) -- say so
        from ..utils import logger
        mods = lora_modules(unet_sd)
        r = next(iter(mods.values()))[0].shape[0]
        targets = tuple(sorted({m.split(".")[-1] if not m.endswith("to_out.0") else "to_out.0" for m in mods}))
        logger.warning("%s has no lora_adapter_metadata header: assuming alpha = rank = %d", p, r)
        spec = LoraSpec(rank=r, alpha=float(r), targets=targets)
    return unet_sd, spec


def load_into(unet: torch.nn.Module, path_or_sd, spec: LoraSpec | None = None, adapter_name: str = "default") -> None:
    """Attach a saved LoRA to ``unet`` as adapter ``adapter_name`` (validated against the model first)."""
    from peft.utils import set_peft_model_state_dict
    if isinstance(path_or_sd, dict):
        sd = path_or_sd
        assert spec is not None, "spec is required with a state dict"
    else:
        sd, spec = load_lora(path_or_sd)
    validate_for_model(sd, unet)
    unet.add_adapter(spec.peft_config(), adapter_name=adapter_name)
    res = set_peft_model_state_dict(unet, sd, adapter_name=adapter_name)
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise SafealignError(f"LoRA keys not used by the model: {unexpected[:3]}")


# -- kohya / webui export ---------------------------------------------------------------------------------------

def to_kohya(sd: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """Keys ``lora_unet_<module_with_underscores>.lora_down/lora_up.weight`` plus ``.alpha`` (A1111, ComfyUI).

    kohya's scale is alpha / rank-of-the-tensor, so alpha is set per module to keep peft's effective scale.
    """
    out: dict[str, torch.Tensor] = {}
    for mod, (a, b) in lora_modules(sd).items():
        key = "lora_unet_" + mod.replace(".", "_")
        out[f"{key}.lora_down.weight"] = a.contiguous()
        out[f"{key}.lora_up.weight"] = b.contiguous()
        out[f"{key}.alpha"] = torch.tensor(spec.scale_for(mod) * a.shape[0], dtype=torch.float32)
    return out


def export_kohya(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    sd, spec = load_lora(src)
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise SafealignError(f"kohya export path {dst} must end in .safetensors")
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(to_kohya(sd, spec), str(tmp), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    os.replace(tmp, dst)
    return dst
