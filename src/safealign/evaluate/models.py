"""The models an evaluation compares: the base pipeline and LoRA sets on it (``NAME=PATH`` or composed
``NAME=PATH1+PATH2``), applied with diffusers' own ``load_lora_weights`` / ``set_adapters`` so that what we
measure is what users run."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import read_manifest
from ..errors import SafealignError
from ..lora import WEIGHT_NAME
from ..utils import logger, sha256_file


@dataclass
class ModelSpec:
    name: str
    loras: list[str] = field(default_factory=list)  # paths; empty = the base model

    def describe(self, infos: dict[str, dict]) -> dict:
        return {"name": self.name, "loras": [infos[p] for p in self.loras]}


def parse_models(lora_specs: Sequence[str], skip_base: bool = False, base_name: str = "base") -> list[ModelSpec]:
    """``["expert=a", "both=a+b"]`` -> [base, expert, both] (names unique, ``base_name`` reserved)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", base_name):
        raise SafealignError(f"--base-name {base_name!r} may use letters, digits, '_', '-' and '.' only")
    models = [] if skip_base else [ModelSpec(base_name)]
    for spec in lora_specs:
        name, paths = spec.split("=", 1)
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise SafealignError(f"--lora name {name!r} may use letters, digits, '_', '-' and '.' only")
        if name in {m.name for m in models} or name == base_name:
            raise SafealignError(f"--lora name {name!r} is used twice (or names the base model); give each set its "
                                 "own name")
        parts = [p.strip() for p in paths.split("+") if p.strip()]
        if not parts:
            raise SafealignError(f"--lora {spec!r} names no LoRA path")
        models.append(ModelSpec(name, parts))
    return models


def lora_file(path: str) -> Path:
    p = Path(path)
    f = p / WEIGHT_NAME if p.is_dir() else p
    if not f.is_file():
        raise SafealignError(f"--lora path {path} does not exist (expected a LoRA folder or .safetensors file)")
    if f.suffix != ".safetensors":
        raise SafealignError(f"--lora {path} is not a .safetensors file; safealign never unpickles weights")
    return f


def lora_info(path: str, family: str, fingerprint: str | None = None) -> dict:
    """What the LoRA's manifest says (role, categories, base model); a different base family is an error."""
    f = lora_file(path)
    folder = f.parent
    man = read_manifest(folder, required=False) or {}
    base = man.get("base_model") or {}
    lfam = base.get("family")
    if lfam and lfam != family:
        raise SafealignError(f"LoRA {path} was made for a {lfam} model ({base.get('source')}) but --model is {family}; "
                             "use a LoRA trained on this base model")
    if base.get("fingerprint") and fingerprint and base["fingerprint"] != fingerprint:
        logger.warning("LoRA %s was trained on a model with another fingerprint (%s, this one %s): same family, "
                       "different weights", path, base.get("fingerprint"), fingerprint)
    return {"path": str(path), "sha256": sha256_file(f)[:16], "role": man.get("role"),
            "categories": man.get("categories"), "base_model": base or None, "method": man.get("method")}


class ModelBank:
    """One loaded pipeline with every distinct LoRA attached once; ``activate(model)`` switches between sets."""

    def __init__(self, backbone, models: list[ModelSpec], scale: float = 1.0):
        self.backbone = backbone
        self.pipe = backbone.pipe
        self.models = models
        self.scale = float(scale)
        self.adapters: dict[str, str] = {}
        self.infos: dict[str, dict] = {}
        fp = backbone.fingerprint()
        for m in models:
            for p in m.loras:
                if p in self.adapters:
                    continue
                self.infos[p] = lora_info(p, backbone.family, fp)
                name = f"a{len(self.adapters)}"
                f = lora_file(p)
                try:
                    self.pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=name)
                except (ValueError, KeyError, RuntimeError) as e:
                    raise SafealignError(f"--lora {p} does not fit --model {backbone.source}: "
                                         f"{str(e).splitlines()[0]}") from None
                self.adapters[p] = name

    def activate(self, model: ModelSpec) -> None:
        if not self.adapters:
            return
        if not model.loras:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        names = [self.adapters[p] for p in model.loras]
        self.pipe.set_adapters(names, adapter_weights=[self.scale] * len(names))
