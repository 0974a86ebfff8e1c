"""Modular LoRA composition: base + frozen safety LoRA + task LoRA(s), summed at inference.

W* = W0 + s_safe * dW_safe + sum_i w_i * dW_task_i. In diffusers terms: each LoRA is an adapter and all are
active through ``set_adapters`` (unfused), or fused into the weights with ``fuse_lora`` (no inference overhead).
Exported either as ONE exact LoRA (the factors concatenated, rank = sum of ranks) or as a fused pipeline folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import atomic_dir, check_output_free, read_manifest, write_manifest
from ..configuration import to_dict
from ..errors import SafealignError
from ..lora import WEIGHT_NAME, load_lora, save_lora, validate_for_model
from ..utils import logger
from .config import ComposeConfig


@dataclass(frozen=True)
class Part:
    name: str
    path: str
    weight: float


def parse_task(spec: str, i: int) -> Part:
    path, _, w = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    try:
        weight = float(w) if w else 1.0
    except ValueError:
        raise SafealignError(f"task {spec!r}: the weight after ':' must be a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise SafealignError(f"task {spec!r}: the weight after ':' must be a finite number >= 0, got {w}")
    return Part(f"task{i}", path or spec, weight)


def parts_of(cfg: ComposeConfig) -> list[Part]:
    parts = [Part("safety", cfg.safety, cfg.safety_weight)] if cfg.safety else []
    return parts + [parse_task(t, i) for i, t in enumerate(cfg.tasks)]


def check_family(part: Part, backbone) -> None:
    """A LoRA made for another base family is refused; a non-safealign LoRA is allowed with a warning."""
    p = Path(part.path)
    man = read_manifest(p if p.is_dir() else p.parent, required=False)
    if man is None:
        logger.warning("%s LoRA %s is not a safealign artifact: its base model, role and categories are unknown",
                       part.name, part.path)
        return
    fam = (man.get("base_model") or {}).get("family")
    if fam and fam != backbone.family:
        raise SafealignError(f"{part.name} LoRA {part.path} was made for a {fam} model, but {backbone.source} is "
                             f"{backbone.family}; use a LoRA trained on this base")


def apply(backbone, parts: list[Part], fuse: bool = False):
    """Load every part into ``backbone.pipe`` as an adapter and activate them together (optionally fused)."""
    pipe = backbone.pipe
    for part in parts:
        check_family(part, backbone)
        sd, _ = load_lora(part.path)
        validate_for_model(sd, backbone.unet, source=f"{part.name} LoRA {part.path}")
        f = Path(part.path)
        kw = {"weight_name": f.name} if f.is_file() else {}
        pipe.load_lora_weights(str(f.parent if f.is_file() else f), adapter_name=part.name, **kw)
    pipe.set_adapters([p.name for p in parts], [p.weight for p in parts])
    if fuse:
        pipe.fuse_lora(adapter_names=[p.name for p in parts], lora_scale=1.0)
        pipe.unload_lora_weights()
    return pipe


def compose(cfg: ComposeConfig) -> Path:
    from ..backbone import load_backbone
    from ..lora.algebra import cat_factors, to_state_dict
    from ..merge.experts import load_expert
    final = check_output_free(cfg.output, cfg.overwrite)
    parts = parts_of(cfg)
    bb = load_backbone(cfg.model)
    for p in parts:
        check_family(p, bb)
    ident = [{"name": p.name, "path": p.path, "weight": p.weight} for p in parts]
    with atomic_dir(final, overwrite=cfg.overwrite) as tmp:
        if cfg.format == "lora":
            for p in parts:
                validate_for_model(load_lora(p.path)[0], bb.unet, source=f"{p.name} LoRA {p.path}")
            experts = [load_expert(p.path) for p in parts]
            mods = sorted(set().union(*(e.modules for e in experts)))
            merged = {}
            for m in mods:
                fs = [(e.modules[m], p.weight) for e, p in zip(experts, parts) if m in e.modules]
                merged[m] = cat_factors([f for f, _ in fs], [w for _, w in fs])
            targets = tuple(sorted(set().union(*(set(e.spec.targets) for e in experts))))
            sd, spec = to_state_dict(merged, targets)
            save_lora(tmp, sd, spec)
            write_manifest(tmp, "lora", role="composed", parts=ident, lora=spec.metadata(), weight_name=WEIGHT_NAME,
                           base_model=bb.identity(), config=to_dict(cfg))
        else:
            pipe = apply(bb, parts, fuse=True)
            pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
            write_manifest(tmp, "pipeline", role="composed", parts=ident, base_model=bb.identity(),
                           config=to_dict(cfg))
    return final
