"""Intervals and tests for rates of flagged images, from statsmodels.

- :func:`wilson`: a binomial proportion's interval (Wilson score, or Clopper-Pearson with ``method="beta"``).
- :func:`paired_comparison`: two models on the same prompts and seeds, image by image: the exact McNemar test and
  Newcombe's hybrid score interval for the difference of the two rates.
- :func:`holm`: Holm's step-down adjustment of a family of p-values (the categories of one prompt set).
- :func:`clustered_paired_test`: two configurations on the same images, several images per prompt: a sign-flip
  permutation test on the per-prompt mean differences (scipy ``permutation_test``), so that the seeds of one prompt
  count as one observation.
- :func:`paired_sample_size` / :func:`paired_power`: how many paired images a one-sided test needs to detect a rise
  (Connor 1987's formula for paired proportions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

Method = Literal["wilson", "beta"]


def wilson(k: int, n: int, level: float = 0.95, method: Method = "wilson") -> tuple[float, float]:
    """Interval of a binomial proportion ``k / n``: the Wilson score interval (Wilson 1927), or the exact
    Clopper-Pearson interval with ``method="beta"`` (statsmodels ``proportion_confint``). ``(nan, nan)`` when
    ``n == 0``. Unlike a bootstrap, 0 of n has a non-zero upper bound (0.19 for 0/16)."""
    from statsmodels.stats.proportion import proportion_confint
    if method not in ("wilson", "beta"):
        raise ValueError(f"method must be 'wilson' or 'beta', got {method!r}")
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    lo, hi = proportion_confint(int(k), int(n), alpha=1.0 - level, method=method)
    return max(0.0, float(lo)), min(1.0, float(hi))


def paired_table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x2 counts ``[[n00, n01], [n10, n11]]``: row = ``a`` flagged, column = ``b`` flagged."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired vectors must be 1-D and of one length, got {a.shape} and {b.shape}")
    return np.array([[np.sum(~a & ~b), np.sum(~a & b)], [np.sum(a & ~b), np.sum(a & b)]], dtype=np.int64)


def newcombe_paired(table: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Interval for ``p_b - p_a`` from paired 0/1 outcomes: Newcombe's hybrid score method without continuity
    correction (method 10 of Newcombe 1998, Stat Med 17:2635).

    With ``(l1, u1)`` and ``(l2, u2)`` the Wilson intervals of ``p1 = p_b`` and ``p2 = p_a`` and ``phi`` the
    correlation of the 2x2 table as Newcombe defines it (cross-product ``n11 n00 - n01 n10`` reduced by ``n/2`` when
    it exceeds ``n/2``, 0 between 0 and ``n/2`` or when a margin is empty), the difference ``d = p1 - p2`` has
    ``lower = d - sqrt((p1-l1)^2 - 2 phi (p1-l1)(u2-p2) + (u2-p2)^2)`` and
    ``upper = d + sqrt((u1-p1)^2 - 2 phi (u1-p1)(p2-l2) + (p2-l2)^2)``."""
    (n00, n01), (n10, n11) = np.asarray(table, dtype=np.int64).tolist()
    n = n00 + n01 + n10 + n11
    if n == 0:
        return float("nan"), float("nan")
    k1, k2 = n01 + n11, n10 + n11  # b flagged, a flagged
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson(k1, n, level)
    l2, u2 = wilson(k2, n, level)
    margins = (n10 + n11) * (n00 + n01) * (n01 + n11) * (n00 + n10)
    cross = n11 * n00 - n01 * n10
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:  # Newcombe's phi: a positive cross-product is shrunk by n/2 (continuity), a negative one is not
        phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def mcnemar_exact(table: np.ndarray) -> float:
    """Two-sided exact McNemar p-value (a binomial test on the discordant pairs; statsmodels ``mcnemar``);
    1.0 when no pair is discordant."""
    from statsmodels.stats.contingency_tables import mcnemar
    t = np.asarray(table, dtype=np.int64)
    if t[0, 1] + t[1, 0] == 0:
        return 1.0
    return min(1.0, float(mcnemar(t, exact=True).pvalue))


def paired_comparison(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict:
    """``b`` against ``a``, two boolean vectors of the same images (same prompt and seed at each position):
    ``{"delta": mean(b) - mean(a), "ci95": Newcombe interval, "p_value": exact McNemar, "n",
    "discordant": [n01, n10]}`` where ``n01`` counts images flagged under ``b`` only, ``n10`` under ``a`` only."""
    t = paired_table(a, b)
    n = int(t.sum())
    if n == 0:
        return {"delta": float("nan"), "ci95": [float("nan"), float("nan")], "p_value": float("nan"), "n": 0,
                "discordant": [0, 0]}
    lo, hi = newcombe_paired(t, level)
    delta = float(np.mean(np.asarray(b, bool))) - float(np.mean(np.asarray(a, bool)))
    return {"delta": delta, "ci95": [lo, hi], "p_value": mcnemar_exact(t), "n": n,
            "discordant": [int(t[0, 1]), int(t[1, 0])]}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979; statsmodels ``multipletests(method="holm")``), in the
    input order; controls the family-wise error rate across the family."""
    if len(p_values) == 0:
        return []
    from statsmodels.stats.multitest import multipletests
    return [float(p) for p in multipletests(np.asarray(p_values, dtype=np.float64), method="holm")[1]]


def clustered_paired_test(before: np.ndarray, after: np.ndarray, clusters: Sequence, *,
                          alternative: Literal["greater", "less", "two-sided"] = "greater", seed: int = 0,
                          n_resamples: int = 9999) -> dict:
    """``after`` against ``before`` (paired per image: 0/1 or real values), clustered: the statistic is the mean
    over clusters (prompts) of each cluster's mean difference, and its null distribution flips the sign of whole
    clusters (scipy ``permutation_test``, ``permutation_type="samples"``; exact when ``2**clusters <=
    n_resamples``). Returns ``{"delta" (per-image mean difference), "p_value", "clusters", "n"}``."""
    from scipy.stats import permutation_test
    a, b = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired vectors must be 1-D and of one length, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return {"delta": float("nan"), "p_value": float("nan"), "clusters": 0, "n": 0}
    keys = list(dict.fromkeys(clusters))
    index = {k: i for i, k in enumerate(keys)}
    ids = np.array([index[c] for c in clusters])
    d = np.bincount(ids, weights=b - a, minlength=len(keys)) / np.bincount(ids, minlength=len(keys))
    if not np.any(d):
        p = 1.0
    else:
        res = permutation_test((d,), np.mean, permutation_type="samples", alternative=alternative,
                               n_resamples=n_resamples, random_state=np.random.default_rng(seed))
        p = float(res.pvalue)
    return {"delta": float(b.mean() - a.mean()), "p_value": min(1.0, p), "clusters": len(keys), "n": int(len(a))}


def paired_sample_size(min_rise: float, power: float = 0.8, alpha: float = 0.05, discordance: float | None = None
                       ) -> int:
    """Paired images a one-sided test at level ``alpha`` needs to detect a rise of ``min_rise`` with ``power``
    (Connor 1987): ``n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2``, with ``psi`` the share of images that
    change verdict (``discordance``; default ``min_rise + 0.1``: the rise itself plus 5% of images changing
    either way)."""
    from scipy.stats import norm
    if not 0 < min_rise < 1 or not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError("min_rise, power and alpha must be in (0, 1)")
    psi = min(1.0, min_rise + 0.1) if discordance is None else float(discordance)
    psi = max(psi, min_rise)
    za, zb = norm.ppf(1 - alpha), norm.ppf(power)
    return int(math.ceil((za * math.sqrt(psi) + zb * math.sqrt(max(0.0, psi - min_rise ** 2))) ** 2 / min_rise ** 2))


def paired_power(n: int, min_rise: float, alpha: float = 0.05, discordance: float | None = None) -> float:
    """The power of the one-sided paired test on ``n`` images to detect ``min_rise`` (the inverse of
    :func:`paired_sample_size`)."""
    from scipy.stats import norm
    if n <= 0:
        return 0.0
    psi = min(1.0, min_rise + 0.1) if discordance is None else float(discordance)
    psi = max(psi, min_rise)
    za = norm.ppf(1 - alpha)
    spread = math.sqrt(max(1e-12, psi - min_rise ** 2))
    return float(norm.cdf((min_rise * math.sqrt(n) - za * math.sqrt(psi)) / spread))
