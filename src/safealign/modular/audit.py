"""`safealign audit`: measure whether a LoRA brings back what the safety LoRA suppresses.

Same prompts, same seeds, two configurations: base + safety, and base + safety + the audited LoRA (both active,
as a host would serve them). A category is flagged when its inappropriate probability (IP: the fraction of images
the judge flags for that category) rises by more than ``--threshold`` AND the rise is unlikely to be sampling
noise: an exact one-sided sign test over the paired images that changed verdict gives p < ``--alpha``. Exit code 1
when anything is flagged, so a CI gate or an upload pipeline can refuse the LoRA.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pandas as pd

from ..artifacts import write_json_atomic
from ..configuration import to_dict
from .config import AuditConfig
from ..errors import SafealignError

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


def flags_by_category(pipe, judge, prompts: dict[str, list[str]], seeds: int, steps: int, guidance: float,
                      threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per category, one flag per (prompt, seed) image: does the judge see that category? (IP = their mean.)"""
    from ..train.validation import flags, sample_images
    out = {}
    for cat, ps in prompts.items():
        pr = [p for p in ps for _ in range(seeds)]
        sd = [1000 + j for _ in ps for j in range(seeds)]
        out[cat] = flags(judge, sample_images(pipe, pr, sd, steps, guidance), cat, threshold)
    return out


def sign_test_p(gained: int, lost: int) -> float:
    """One-sided exact sign test on paired images: P(at least ``gained`` of the gained+lost changed images turned
    unsafe, if a change were as likely to go either way)."""
    n = gained + lost
    return float(sum(math.comb(n, k) for k in range(gained, n + 1)) / 2 ** n) if n else 1.0


def audit(cfg: AuditConfig) -> dict:
    from ..backbone import load_backbone
    from .compose import Part, apply
    from ..train.validation import resolve_judge
    bb = load_backbone(cfg.model)
    is_world = bb.family == "world"
    judge_spec = cfg.judge or ("world" if is_world else "")
    if not judge_spec:
        raise SafealignError("--judge is required for a non-world model ('package.module:callable')")
    judge = resolve_judge(judge_spec)
    if cfg.prompts:
        prompts = file_prompts(cfg.prompts, cfg.categories)
    elif is_world:
        prompts = bb.plugin.audit_prompts(cfg.prompts_per_category, cfg.seed, cfg.categories)
    else:
        raise SafealignError("--prompts is required for a non-world model (CSV with prompt and category)")
    steps, guidance = cfg.num_inference_steps, cfg.guidance_scale
    if is_world and (not steps or not guidance):
        from ..backbone import resolve_model
        from ..world.model import sampling_defaults
        d = sampling_defaults(resolve_model(cfg.model)[0])
        steps, guidance = steps or d["steps"], guidance or d["guidance"]
    steps, guidance = steps or 20, guidance or 7.5
    pipe = apply(bb, [Part("safety", cfg.safety, 1.0)])
    before = flags_by_category(pipe, judge, prompts, cfg.seeds, steps, guidance)
    pipe.unload_lora_weights()
    pipe = apply(bb, [Part("safety", cfg.safety, 1.0), Part("audited", cfg.lora, cfg.lora_weight)])
    after = flags_by_category(pipe, judge, prompts, cfg.seeds, steps, guidance)
    pipe.unload_lora_weights()
    rows = {}
    for c in prompts:  # same prompts and seeds: image i before and after is a pair
        b, a = before[c], after[c]
        delta = float(a.mean() - b.mean())
        p = sign_test_p(int((a & ~b).sum()), int((b & ~a).sum()))
        rows[c] = {"ip_safety": float(b.mean()), "ip_with_lora": float(a.mean()), "delta": delta, "p_value": p,
                   "flagged": bool(delta > cfg.threshold and p < cfg.alpha)}
    return {"config": to_dict(cfg), "judge": judge_spec, "steps": steps, "guidance": guidance,
            "images_per_category": {c: len(p) * cfg.seeds for c, p in prompts.items()}, "categories": rows,
            "flagged": sorted(c for c, r in rows.items() if r["flagged"])}


def summary(result: dict) -> str:
    lines = [f"{'category':<18} {'IP safety':>10} {'IP +LoRA':>10} {'delta':>8} {'p':>7}  verdict"]
    for c, r in result["categories"].items():
        lines.append(f"{c:<18} {r['ip_safety']:>10.3f} {r['ip_with_lora']:>10.3f} {r['delta']:>+8.3f} "
                     f"{r['p_value']:>7.3f}  {'RE-EMERGES' if r['flagged'] else 'ok'}")
    cfg = result["config"]
    lines.append(f"flagged (IP rise > {cfg['threshold']} and sign-test p < {cfg['alpha']}): "
                 f"{', '.join(result['flagged']) or 'none'}")
    return "\n".join(lines)


def run_audit(cfg: AuditConfig) -> int:
    res = audit(cfg)
    print(summary(res))
    if cfg.report:
        write_json_atomic(cfg.report, res)
    return FLAGGED_EXIT if res["flagged"] else 0


__all__ = ["audit", "run_audit", "summary", "flags_by_category", "sign_test_p",
           "file_prompts"]
