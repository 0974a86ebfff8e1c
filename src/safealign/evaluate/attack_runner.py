"""``safealign evaluate --attacks``: every attack on every model, per category, with its budget and intervals.

For each category the first ``attack_prompts`` unsafe prompts are attacked on each model (the model's active LoRA
set is the defended model). Reported per model and attack: ``asr`` (attacked images the judges flag) and
``clean_rate`` (the same prompts and seeds without the attack), each with its Wilson 95% interval, overall and per
category, the ``budget`` the attack ran under, and per prompt what the attack did (success, iterations, the final
discrete prompt, the loss or distance curve).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import SafealignError
from ..sampling import SamplingOptions, generate
from ..utils import logger
from . import attacks as A
from .models import ModelSpec
from .statistics import wilson


def budget(cfg, attack: str, context: int) -> dict:
    """What an attack was allowed to spend, as the report states it."""
    common = {"prompts_per_category": int(cfg.attack_prompts), "judge_image": "one image per check, the prompt's seed"}
    if attack == "ringabell-vector":
        return {**common, "strengths": list(cfg.ringabell_strengths), "search": "strengths in ascending order",
                "input": "prompt embedding + strength x concept vector (not a typeable prompt)"}
    search = {"optimiser": "greedy coordinate gradient (one-hot token gradients, exact scoring of single swaps)",
              "candidates": int(cfg.attack_candidates), "topk": A.TOPK}
    if attack == "ringabell":
        return {**common, **search, "tokens": A.ringabell_tokens(context, cfg.ringabell_tokens),
                "strengths": list(cfg.ringabell_strengths), "iterations_per_strength": int(cfg.ringabell_iterations),
                "objective": "mean squared distance of text-encoder states to E(prompt) + strength x concept vector",
                "judge_checks": "one per strength, after its search"}
    return {**common, **search, "tokens": int(cfg.unlearndiff_tokens), "iterations": int(cfg.unlearndiff_iterations),
            "restarts": int(cfg.unlearndiff_restarts), "timesteps": A.TIMESTEPS,
            "objective": "defended UNet's denoising loss toward the base model's image of the prompt and seed, at "
                         "fixed timesteps and noise",
            "judge_checks": "on the start and every new discrete prompt; success stops"}


def _rate(flags) -> tuple[float, list[float], int, int]:
    f = np.asarray(flags, bool)
    k, n = int(f.sum()), int(f.size)
    return (float(k / n) if n else float("nan")), list(wilson(k, n)), k, n


def _cell(success, clean, prompts: list[dict], extra: dict) -> dict:
    asr, ci, k, n = _rate(success)
    out = {"asr": asr, "ci95": ci, "successes": k, "n": n, **extra, "prompts": prompts}
    if clean is not None:
        out["clean_rate"], out["clean_ci95"], out["clean_flagged"], _ = _rate(clean)
    else:
        out["clean_rate"] = out["clean_ci95"] = None
    return out


def _summarise(res: dict) -> None:
    per = res["per_category"].values()
    s = [p["success"] for v in per for p in v["prompts"]]
    res["asr"], res["ci95"], res["successes"], res["n"] = _rate(s)
    if per and all(v["clean_rate"] is not None for v in per):
        k, n = sum(v["clean_flagged"] for v in per), sum(v["n"] for v in per)
        res["clean_rate"], res["clean_ci95"] = float(k / n) if n else float("nan"), list(wilson(k, n))
    else:
        res["clean_rate"] = res["clean_ci95"] = None


def _vector(backbone, unsafe: pd.DataFrame, safe: pd.DataFrame, category: str):
    """The category's concept vector: its unsafe prompts against their safe twins, else against the empty prompt."""
    pu, tw = unsafe[unsafe["category"] == category], safe[safe["category"] == category]
    if len(tw) and (tw["pair"] != "").all():
        merged = pu.merge(tw, on="pair", suffixes=("_u", "_s"))
        if len(merged):
            return (A.concept_vector(backbone, merged["prompt_u"].tolist(), merged["prompt_s"].tolist()),
                    f"{len(merged)} unsafe prompts against their safe twins")
    return A.concept_vector(backbone, pu["prompt"].tolist(), [""] * len(pu)), \
        f"{len(pu)} unsafe prompts against the empty prompt (no safe twins)"


def _attack(cfg, attack: str, backbone, judge_fn, rows: pd.DataFrame, c: str, setup, options) -> dict:
    ps, ss = rows["prompt"].tolist(), [int(s) for s in rows["seed"]]
    steps, guidance = options.steps, options.guidance
    if attack == "ringabell-vector":
        return A.ring_a_bell_vector(backbone, judge_fn, ps, ss, setup, cfg.ringabell_strengths, c, steps, guidance)
    if attack == "ringabell":
        return A.ring_a_bell(backbone, judge_fn, ps, ss, setup, cfg.ringabell_strengths, c, steps, guidance,
                             n_tokens=cfg.ringabell_tokens, iterations=cfg.ringabell_iterations,
                             candidates=cfg.attack_candidates)
    runs = [A.unlearn_diff(backbone, judge_fn, p, s, t, c, steps, guidance, n_tokens=cfg.unlearndiff_tokens,
                           iterations=cfg.unlearndiff_iterations, restarts=cfg.unlearndiff_restarts,
                           candidates=cfg.attack_candidates) for p, s, t in zip(ps, ss, setup)]
    return {"success": np.array([r["success"] for r in runs], bool), "images": np.stack([r.pop("image") for r in runs]),
            "prompts": runs}


def run_attacks(cfg, backbone, bank, models, judges, thresholds, table, images, options: SamplingOptions):
    """Each attack on each model, per category: ASR next to the same prompts' unattacked rate (``clean_rate``), both
    with Wilson intervals, the budget and per-prompt details. Returns (results per model, images per model, attack
    and category for the report's grids)."""
    def judge_fn(imgs, category):
        return A.hit({j.name: j(imgs) for j in judges}, thresholds, category)

    A.check_family(backbone)
    unsafe = table[table["set"] == "unsafe"]
    safe = table[table["set"] == "safe"]
    if len(unsafe) == 0:
        raise SafealignError("--attacks needs unsafe prompts in the prompt set (set column 'unsafe')")
    context = int(backbone.pipe.tokenizer.model_max_length)
    out: dict = {m.name: {} for m in models}
    pics: dict = {m.name: {} for m in models}
    cats = list(dict.fromkeys(unsafe["category"]))
    for attack in cfg.attacks:
        for m in models:
            out[m.name][attack] = {"budget": budget(cfg, attack, context), "per_category": {}}
        for c in cats:
            rows = unsafe[unsafe["category"] == c].head(cfg.attack_prompts)
            extra: dict = {}
            if attack.startswith("ringabell"):
                setup, extra["concept_vector"] = _vector(backbone, unsafe, safe, c)
            elif cfg.base_name in images:  # unlearndiff's targets: the base model's images of these prompts
                setup = images[cfg.base_name][rows.index.to_numpy()]
            else:
                bank.activate(ModelSpec(cfg.base_name))
                setup = generate(backbone.pipe, rows["prompt"].tolist(), rows["seed"].tolist(), options,
                                 batch_size=cfg.batch_size)
            for m in models:
                bank.activate(m)
                logger.info("attack %s on %s: %d %s prompts", attack, m.name, len(rows), c)
                r = _attack(cfg, attack, backbone, judge_fn, rows, c, setup, options)
                # the same prompts and seeds without the attack: what the attack adds
                clean = judge_fn(images[m.name][rows.index.to_numpy()], c) if m.name in images else None
                out[m.name][attack]["per_category"][c] = _cell(r["success"], clean, r["prompts"], extra)
                pics[m.name].setdefault(attack, {})[c] = r["images"]
        for m in models:
            _summarise(out[m.name][attack])
    return out, pics
