"""Results over several training seeds: one report per seed, aggregated per model and figure as mean, spread
(sample standard deviation) and a 95% Student-t interval of the mean (scipy), with every seed's value kept.

    safealign evaluate aggregate runs/seed0/report runs/seed1/report runs/seed2/report --output summary.json

A training seed's report is one draw of the whole recipe (data order, noise, initialisation): the interval says how
much the figure moves when the recipe is run again, which a single run's Wilson interval (over images) cannot.
The reports must be comparable: same prompt set (hash), pool, sampler and judges; otherwise the aggregate refuses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import SafealignError
from .report import headline


def _load(path: str | Path) -> dict:
    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise SafealignError(f"{path} is not a report folder or report.json; pass the folders `evaluate` wrote")
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError):
        raise SafealignError(f"{f} is not valid JSON; re-run the evaluation that wrote it") from None


def _identity(report: dict) -> dict:
    """What must be equal for two reports to be seeds of one experiment."""
    s = report.get("sampler", {})
    return {"prompts": report.get("prompts", {}).get("sha256"), "pool": report.get("pool"),
            "sampler": (s.get("scheduler"), s.get("steps"), s.get("guidance"), s.get("resolution")),
            "judges": sorted((j.get("name"), j.get("version"), j.get("threshold")) for j in report.get("judges", [])),
            "card": report.get("card", {}).get("card_sha256")}


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """``{"mean", "std", "ci95", "n", "values"}``; the interval is the Student-t interval of the mean (nan for
    fewer than two values)."""
    from scipy import stats
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": [float("nan")] * 2, "n": 0, "values": []}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else float("nan")
    if n > 1:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))
        ci = [mean - half, mean + half]
    else:
        ci = [float("nan"), float("nan")]
    return {"mean": mean, "std": std, "ci95": ci, "n": n, "values": [float(x) for x in v]}


def aggregate(paths: Sequence[str | Path]) -> dict:
    """Per model and headline figure over the reports of several training seeds."""
    if len(paths) < 2:
        raise SafealignError("aggregate needs at least two reports (one per training seed)")
    reports = [_load(p) for p in paths]
    ids = [_identity(r) for r in reports]
    for p, i in zip(paths[1:], ids[1:]):
        diff = [k for k in i if i[k] != ids[0][k]]
        if diff:
            raise SafealignError(f"{p} differs from {paths[0]} in {', '.join(diff)}: not seeds of one experiment; "
                                 "evaluate every seed's models with the same prompts, pool, sampler and judges")
    heads = [headline(r) for r in reports]
    models = [m for m in heads[0] if all(m in h for h in heads)]
    out: dict = {"kind": "aggregate", "reports": [str(p) for p in paths], "seeds": len(paths),
                 "pool": reports[0].get("pool"), "interval": "Student t, 95%, over training seeds", "models": {}}
    for m in models:
        keys = [k for k in heads[0][m] if all(k in h[m] for h in heads)]
        out["models"][m] = {k: mean_interval([h[m][k] for h in heads]) for k in keys}
    return out


def format_aggregate(agg: dict) -> str:
    lines = [f"{agg['seeds']} training seeds, pool {agg['pool']}: mean +- sd [95% t-interval]"]
    for m, figs in agg["models"].items():
        lines.append(f"{m}:")
        for k, v in figs.items():
            lines.append(f"  {k:<22} {v['mean']:.3f} +- {v['std']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
    return "\n".join(lines)


__all__ = ["aggregate", "mean_interval", "format_aggregate"]
