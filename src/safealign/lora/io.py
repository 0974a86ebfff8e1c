"""LoRA files in diffusers' format: save and load with metadata, validate against a UNet, export to kohya.

On disk (diffusers' convention): ``pytorch_lora_weights.safetensors`` with keys ``unet.<module>.lora_A.weight`` /
``lora_B.weight`` and the LoraConfig as JSON in the safetensors header under ``lora_adapter_metadata``
(keys prefixed ``unet.``). Without that header diffusers infers the rank from the shapes and silently loses
``lora_alpha``, so every file we write carries it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import SafealignError
from .algebra import lora_modules
from .spec import LoraSpec

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _check_tensor(name: str, t: torch.Tensor, source: str) -> None:
    if not t.is_floating_point():
        raise SafealignError(f"{source}: {name} has dtype {str(t.dtype).replace('torch.', '')}; LoRA weights must be "
                             "floating point (float32/float16/bfloat16)")
    if t.dim() not in (2, 4):
        raise SafealignError(f"{source}: {name} is {t.dim()}-D {tuple(t.shape)}; LoRA factors are 2-D (Linear) or "
                             "4-D (Conv)")
    if t.numel() == 0:
        raise SafealignError(f"{source}: {name} is empty {tuple(t.shape)}")


def validate_state_dict(sd: dict[str, torch.Tensor], source: str = "LoRA") -> None:
    """Keys well-formed, pairs complete, floating 2-D/4-D factors of one rank per module, values finite."""
    if not sd:
        raise SafealignError(f"{source} holds no LoRA weights")
    for mod, (a, b) in lora_modules(sd).items():
        if not _MODULE.fullmatch(mod):
            raise SafealignError(f"{source}: {mod!r} is not a module name (dot-separated identifiers); the file's "
                                 "keys are damaged")
        for n, t in (("lora_A", a), ("lora_B", b)):
            _check_tensor(f"{mod}.{n}", t, source)
        if a.dim() != b.dim():
            raise SafealignError(f"{source}: {mod} has a {a.dim()}-D lora_A but a {b.dim()}-D lora_B")
        if a.shape[0] != b.shape[1]:
            raise SafealignError(f"{source}: {mod} has lora_A rank {a.shape[0]} but lora_B rank {b.shape[1]}")
        for n, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t).all():
                raise SafealignError(f"{source}: {mod}.{n} contains NaN or Inf; the file is damaged or training "
                                     "diverged")


def tensor_ranks(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """module -> the rank its factors have (rows of lora_A)."""
    return {mod: int(a.shape[0]) for mod, (a, _) in lora_modules(sd).items()}


def _targets_cover(targets: tuple[str, ...], mod: str) -> bool:
    """peft's rule: a module is targeted when its name is a target or ends in '.' + target (a single target may
    also be a regular expression matching the whole name)."""
    if any(mod == t or mod.endswith("." + t) for t in targets):
        return True
    if len(targets) == 1:
        try:
            return re.fullmatch(targets[0], mod) is not None
        except re.error:
            return False
    return False


def check_spec(sd: dict[str, torch.Tensor], spec: LoraSpec, source: str = "LoRA") -> None:
    """The header agrees with the tensors: each module's rank is the header's (rank_pattern honoured) and each
    module is one of its target_modules -- otherwise diffusers would build other shapes or drop modules."""
    for mod, r in tensor_ranks(sd).items():
        want = spec.rank_for(mod)
        if r != want:
            raise SafealignError(f"{source}: the header says rank {want} for {mod} but its tensors have rank {r}; "
                                 "the header is wrong -- re-save the file (or drop lora_adapter_metadata)")
        if not _targets_cover(spec.targets, mod):
            raise SafealignError(f"{source}: module {mod} is not in the header's target_modules "
                                 f"({', '.join(spec.targets)}); diffusers would drop it -- re-save the file")


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
        spec = LoraSpec.from_metadata(_header_config(raw, p), source=f"{p} header")
        check_spec(unet_sd, spec, source=str(p))
    else:  # no header: ranks from shapes, alpha = rank (what diffusers assumes) -- say so
        from ..utils import logger
        ranks = tensor_ranks(unet_sd)
        common = max(sorted(set(ranks.values())), key=list(ranks.values()).count)
        pattern = {m: r for m, r in ranks.items() if r != common}
        targets = tuple(sorted({m.split(".")[-1] if not m.endswith("to_out.0") else "to_out.0" for m in ranks}))
        logger.warning("%s has no lora_adapter_metadata header: assuming alpha = rank = %d", p, common)
        spec = LoraSpec(rank=common, alpha=float(common), targets=targets, rank_pattern=pattern,
                        alpha_pattern={k: float(r) for k, r in pattern.items()})
    return unet_sd, spec


def _header_config(raw: str, p: Path) -> dict:
    """The UNet's LoraConfig from the ``lora_adapter_metadata`` JSON (keys ``unet.*``; unprefixed keys are read
    when none is prefixed)."""
    try:
        md = json.loads(raw)
    except ValueError as e:
        raise SafealignError(f"{p}: the {METADATA_KEY} header is not valid JSON ({e}); re-save the file") from None
    if not isinstance(md, dict):
        raise SafealignError(f"{p}: the {METADATA_KEY} header must be a JSON object, got {type(md).__name__}")
    unet = {k[len("unet."):]: v for k, v in md.items() if k.startswith("unet.")}
    return unet or {k: v for k, v in md.items() if "." not in k}


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
