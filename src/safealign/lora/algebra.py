"""Exact LoRA factor algebra shared by merge and compose.

Per module the factors are (A [r, in], B [out, r]) with dW = B @ A. Concatenating factors sums their updates exactly,
so a sum of LoRAs is again a LoRA (of rank sum(r_e)) that diffusers loads unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..errors import SafealignError
from .spec import LoraSpec

Factors = tuple[torch.Tensor, torch.Tensor]


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


def cat_factors(factors: Sequence[Factors], weights: Sequence[float] | None = None) -> Factors:
    """A = [A_1; ...; A_E], B = [w_1 B_1, ..., w_E B_E]: B @ A = sum_e w_e B_e A_e exactly."""
    w = [1.0] * len(factors) if weights is None else list(weights)
    a = torch.cat([f[0] for f in factors], dim=0)
    b = torch.cat([wi * f[1] for wi, f in zip(w, factors)], dim=1)
    return a, b


def to_state_dict(modules: dict[str, Factors], targets: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], LoraSpec]:
    """Factors (scale folded in) -> a peft-keyed state dict and a scale-1 spec (rank_pattern where ranks vary)."""
    sd, ranks = {}, {}
    for m, (a, b) in modules.items():
        sd[f"{m}.lora_A.weight"] = a.contiguous()
        sd[f"{m}.lora_B.weight"] = b.contiguous()
        ranks[m] = a.shape[0]
    values = list(ranks.values())
    common = max(set(values), key=values.count)
    pattern = {m: r for m, r in ranks.items() if r != common}
    return sd, LoraSpec(rank=common, alpha=float(common), targets=tuple(targets), rank_pattern=pattern,
                        alpha_pattern={m: float(r) for m, r in pattern.items()})
