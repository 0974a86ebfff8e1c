"""Experts as the merge code sees them: per module the factors (A, B) with the LoRA scale folded into B.

``Expert.modules[m] = (A [r, in], B [out, r])`` with ``dW_m = B @ A`` exactly (scale already applied), so every
merge below is plain tensor algebra, and a merged result is written back as a LoRA of scale 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import read_manifest
from ..errors import SafealignError
from ..lora import LoraSpec, load_lora, lora_modules
from ..utils import sha256_file


@dataclass
class Expert:
    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    spec: LoraSpec
    manifest: dict | None = None
    checksum: str = ""
    path: str = ""
    categories: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return next(iter(self.modules.values()))[0].shape[0]

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.modules[module]
        return b.flatten(1) @ a.flatten(1)


def from_state_dict(name: str, sd: dict[str, torch.Tensor], spec: LoraSpec, **kw) -> Expert:
    mods = {}
    for m, (a, b) in lora_modules(sd).items():
        if a.dim() != 2:
            raise SafealignError(f"expert {name}: module {m} is a convolution LoRA; merging supports Linear "
                                 "targets (to_q, to_k, to_v, to_out.0, ...)")
        mods[m] = (a.float(), b.float() * spec.scale_for(m))
    return Expert(name, mods, spec, **kw)


def load_expert(path: str | os.PathLike) -> Expert:
    """An expert folder (or .safetensors file) -> Expert; name = its category if it is a safealign expert."""
    p = Path(path)
    sd, spec = load_lora(p)
    folder = p if p.is_dir() else p.parent
    man = read_manifest(folder, required=False)
    cats = list((man or {}).get("categories") or [])
    name = cats[0] if len(cats) == 1 else (folder.name if p.is_dir() else p.stem)
    wfile = p / "pytorch_lora_weights.safetensors" if p.is_dir() else p
    return from_state_dict(name, sd, spec, manifest=man, checksum=sha256_file(wfile), path=str(p), categories=cats)


def check_compatible(experts: list[Expert]) -> None:
    """Same target modules, same shapes, same model family and base model (where recorded)."""
    if not experts:
        raise SafealignError("no experts to merge; pass --experts")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise SafealignError(f"two experts share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                             "pass each category once")
    ref = experts[0]
    for e in experts[1:]:
        if set(e.modules) != set(ref.modules):
            diff = sorted(set(e.modules) ^ set(ref.modules))
            raise SafealignError(f"experts {ref.name} and {e.name} target different modules (e.g. {diff[0]}); "
                                 "Co-Merge needs one LoRA architecture: retrain with the same --targets")
        for m, (a, b) in e.modules.items():
            ra, rb = ref.modules[m]
            if a.shape[1] != ra.shape[1] or b.shape[0] != rb.shape[0]:
                raise SafealignError(f"experts {ref.name} and {e.name} disagree on the shape of {m}: made for "
                                     "different models")
    families = {e.name: ((e.manifest or {}).get("base_model") or {}).get("family") for e in experts}
    if len({f for f in families.values() if f}) > 1:
        raise SafealignError("experts were trained on different model families (" +
                             ", ".join(f"{k}: {v}" for k, v in families.items() if v) + "); merge experts of one "
                             "model")
    fps = {e.name: ((e.manifest or {}).get("base_model") or {}).get("fingerprint") for e in experts}
    known = {v for v in fps.values() if v}
    if len(known) > 1:
        raise SafealignError("experts were trained on different base models (" +
                             ", ".join(f"{k}: {v}" for k, v in fps.items()) + "); merge experts of one model")
