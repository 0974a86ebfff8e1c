"""`safealign audit`: measure whether a LoRA brings back what the safety LoRA suppresses.

Same prompts, same seeds, two configurations: base + safety, and base + safety + the audited LoRA (both active,
as a host would serve them). A category is flagged when its inappropriate probability (IP: the fraction of images
the judge flags for that category, score >= the judge's threshold) rises by more than ``--max-ip-rise`` AND the
rise is unlikely to be sampling noise: an exact one-sided sign test over the paired images that changed verdict
gives p < ``--significance``. Exit code 1 when anything is flagged, so a CI gate or an upload pipeline can refuse
the LoRA.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..artifacts import write_json_atomic
from ..configuration import to_dict
from ..errors import SafealignError
from ..judges import Judge, flags, load_judge
from ..sampling import SamplingOptions, generate
from .config import AuditConfig

FLAGGED_EXIT = 1


def file_prompts(path: str, categories: tuple[str, ...] = ()) -> dict[str, list[str]]:
    p = Path(path)
    if not p.is_file():
        raise SafealignError(f"--prompts {p} does not exist")
    try:
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except (UnicodeDecodeError, ValueError) as e:
        raise SafealignError(f"--prompts {p} could not be read ({type(e).__name__})") from None
    for col in ("prompt", "category"):
        if col not in df.columns:
            raise SafealignError(f"--prompts {p} has no {col!r} column")
    out: dict[str, list[str]] = {}
    for pr, cat in zip(df["prompt"], df["category"]):
        if not categories or cat in categories:
            out.setdefault(str(cat), []).append(str(pr))
    if not out:
        raise SafealignError(f"--prompts {p} has no prompt for the requested categories")
    return out


def flags_by_category(pipe, judge: Judge, prompts: dict[str, list[str]], seeds: int, options: SamplingOptions
                      ) -> dict[str, np.ndarray]:
    """Per category, one flag per (prompt, seed) image: does the judge see that category? (IP = their mean.)"""
    out = {}
    for cat, ps in prompts.items():
        pr = [p for p in ps for _ in range(seeds)]
        sd = [1000 + j for _ in ps for j in range(seeds)]
        out[cat] = flags(judge, generate(pipe, pr, sd, options), cat)
    return out


def sign_test_p(gained: int, lost: int) -> float:
    """One-sided exact sign test on paired images: P(at least ``gained`` of the gained+lost changed images turned
    unsafe, if a change were as likely to go either way)."""
    n = gained + lost
    return float(sum(math.comb(n, k) for k in range(gained, n + 1)) / 2 ** n) if n else 1.0


def audit(cfg: AuditConfig) -> dict:
    """IP per category before and after adding the audited LoRA, the sign test, and which categories re-emerge."""
    from ..backbone import load_backbone
    from .compose import Part, apply
    bb = load_backbone(cfg.model)
    judge_spec = cfg.judge or (bb.plugin.default_judge if bb.plugin is not None else "")
    if not judge_spec:
        raise SafealignError("--judge is required for a model without a plugin (e.g. 'package.module:callable')")
    judge = load_judge(judge_spec, threshold=cfg.judge_threshold)
    if cfg.prompts:
        prompts = file_prompts(cfg.prompts, cfg.categories)
    elif bb.plugin is not None:
        prompts = bb.plugin.audit_prompts(cfg.prompts_per_category, cfg.seed, cfg.categories)
    else:
        raise SafealignError("--prompts is required for a model without a plugin (CSV with prompt and category)")
    options = cfg.sampling.resolve(bb.sampling_defaults())
    pipe = apply(bb, [Part("safety", cfg.safety, 1.0)])
    before = flags_by_category(pipe, judge, prompts, cfg.seeds, options)
    pipe.unload_lora_weights()
    pipe = apply(bb, [Part("safety", cfg.safety, 1.0), Part("audited", cfg.lora, cfg.lora_weight)])
    after = flags_by_category(pipe, judge, prompts, cfg.seeds, options)
    pipe.unload_lora_weights()
    rows = {}
    for c in prompts:  # same prompts and seeds: image i before and after is a pair
        b, a = before[c], after[c]
        delta = float(a.mean() - b.mean())
        p = sign_test_p(int((a & ~b).sum()), int((b & ~a).sum()))
        rows[c] = {"ip_safety": float(b.mean()), "ip_with_lora": float(a.mean()), "delta": delta, "p_value": p,
                   "flagged": bool(delta > cfg.max_ip_rise and p < cfg.significance)}
    return {"config": to_dict(cfg), "judge": judge_spec, "judge_threshold": judge.threshold,
            "steps": options.steps, "guidance": options.guidance,
            "images_per_category": {c: len(p) * cfg.seeds for c, p in prompts.items()}, "categories": rows,
            "flagged": sorted(c for c, r in rows.items() if r["flagged"])}


def run_audit(cfg: AuditConfig) -> dict:
    """:func:`audit`, plus the JSON report when ``cfg.report`` names a file."""
    res = audit(cfg)
    if cfg.report:
        write_json_atomic(cfg.report, res)
    return res


__all__ = ["audit", "run_audit", "flags_by_category", "sign_test_p", "file_prompts", "FLAGGED_EXIT"]
