"""Baseline merges of LoRA experts as pure tensor functions (per module).

Exact low-rank results:
- ``cat``: concatenate the factors: dW = sum_e dW_e exactly (all experts active at once), rank sum(r_e).
- ``linear``: weighted concatenation: dW = sum_e w_e dW_e (weights default 1/E: the average).
- ``task_arithmetic``: the same with user weights lambda_e (default 1: equal to cat).

Dense merges re-factored by SVD to rank sum(r_e) (so the result is again a LoRA; the truncation error is reported):
- ``ties`` (Yadav et al. 2023): trim to the top-density magnitudes, elect the majority sign, disjoint mean.
- ``dare`` (Yu et al. 2024): random drop with rescale, then linear sum (``dare_ties``: then TIES' sign election).
The dense arithmetic is PEFT's ``merge_utils`` (the implementations the field uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..lora.algebra import Factors, cat_factors

DenseMethod = Literal["ties", "dare", "dare_ties"]


def linear(factors: Sequence[Factors], weights: Sequence[float] | None = None) -> Factors:
    """Weighted average (weights normalised to sum 1; default uniform)."""
    w = torch.tensor([1.0] * len(factors) if weights is None else list(weights), dtype=torch.float64)
    w = (w / w.sum()).tolist()
    return cat_factors(factors, w)


def task_arithmetic(factors: Sequence[Factors], weights: Sequence[float] | None = None) -> Factors:
    """sum_e lambda_e dW_e (default lambda = 1)."""
    return cat_factors(factors, weights)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[Factors, float]:
    """Best rank-``rank`` factors of ``delta`` and the relative Frobenius error of the truncation."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.numel())
    b = (u[:, :k] * s[:k].sqrt()).float()
    a = (s[:k].sqrt()[:, None] * vh[:k]).float()
    err = float(s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt().clamp_min(1e-30))
    return (a, b), err


def dense_merge(factors: Sequence[Factors], method: DenseMethod, weights: Sequence[float] | None = None,
                density: float = 0.5, seed: int = 0) -> tuple[Factors, float]:
    """TIES / DARE on the dense updates, re-factored to rank sum(r_e). Returns (factors, truncation error)."""
    from peft.utils import merge_utils as mu
    deltas = [b @ a for a, b in factors]
    w = torch.tensor([1.0] * len(factors) if weights is None else list(weights), dtype=deltas[0].dtype)
    if method == "ties":
        merged = mu.ties(deltas, w, density=density, majority_sign_method="total")
    elif method == "dare":
        torch.manual_seed(seed)  # DARE's random drop uses the global generator
        merged = mu.dare_linear(deltas, w, density=density)
    elif method == "dare_ties":
        torch.manual_seed(seed)
        merged = mu.dare_ties(deltas, w, density=density, majority_sign_method="total")
    else:
        raise ValueError(f"unknown dense merge {method!r}")
    return svd_factors(merged, sum(a.shape[0] for a, _ in factors))
