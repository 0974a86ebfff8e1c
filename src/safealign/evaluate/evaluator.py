"""`safealign evaluate`: sample every model on the same prompts and seeds, judge, measure, attack, report.

    results = evaluate(cfg)          # -> Path of the report folder (report.json, index.html, charts/, grids/)

Everything that decides a number goes into ``report.json``: judge names, versions and thresholds, the prompt set
(with a hash), every seed, the sampler (scheduler class, steps, guidance), the models and LoRA files (hashes,
recorded base models) and the config.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..artifacts import atomic_dir, check_output_free, write_json_atomic, write_manifest
from ..configuration import to_dict
from ..errors import SafealignError
from ..judges import Judge, build_judges, describe
from ..judges.clip import load_local_clip
from ..sampling import SamplingOptions, generate
from ..utils import logger
from . import metrics as M
from .config import EvaluateConfig
from .models import ModelBank, ModelSpec, parse_models
from .prompts import load_prompts

REPORT = "report.json"
#: how the report's intervals and comparisons are computed (recorded in report.json)
STATISTICS = {"interval": "Wilson score, 95%", "paired_test": "exact McNemar, two-sided",
              "paired_interval": "Newcombe hybrid score (1998, method 10), 95%",
              "multiplicity": "Holm across the categories of one prompt set", "pairing": "same prompt and seed"}


def sampler_settings(backbone, cfg: EvaluateConfig) -> dict:
    """The sampler as the report records it: steps and guidance resolved once (the config's, else the model's)."""
    opts = cfg.sampling.resolve(backbone.sampling_defaults())
    sch = backbone.pipe.scheduler
    return {"scheduler": type(sch).__name__, "scheduler_config": {k: v for k, v in dict(sch.config).items()
                                                                  if not k.startswith("_")},
            "steps": int(opts.steps), "guidance": float(opts.guidance), "resolution": backbone.resolution,
            "dtype": str(backbone.unet.dtype), "device": cfg.device, "seeding": "torch.Generator('cpu') per image"}


def judge_images(judges: Sequence[Judge], images: np.ndarray) -> tuple[dict, dict | None]:
    """``{judge: {category: probs}}`` and, from a judge that reads attributes, its attribute predictions."""
    scores, attrs = {}, None
    for j in judges:
        if hasattr(j, "scores_and_attributes"):
            scores[j.name], attrs = j.scores_and_attributes(images)
        else:
            scores[j.name] = j(images)
    return scores, attrs


def _hazard_flags(scores: dict, thresholds: dict, categories: Sequence[str]) -> np.ndarray:
    """Per image: flagged in its own prompt category (judges without that category: any of theirs)."""
    from .attacks import hit
    out = np.zeros(len(categories), bool)
    for c in set(categories):
        idx = [i for i, x in enumerate(categories) if x == c]
        sub = {j: {k: np.asarray(v)[idx] for k, v in cats.items()} for j, cats in scores.items()}
        out[idx] = hit(sub, thresholds, c)
    return out


def _read_reference(folder: str) -> np.ndarray:
    from PIL import Image
    p = Path(folder)
    files = sorted(f for f in p.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) if p.is_dir() \
        else []
    if not files:
        raise SafealignError(f"--reference {folder} holds no images (png/jpg/webp); the image set is empty")
    ims = [Image.open(f).convert("RGB") for f in files]
    size = ims[0].size
    return np.stack([np.asarray(im if im.size == size else im.resize(size, Image.BICUBIC)) for im in ims])


def _features(cfg: EvaluateConfig, judges: Sequence[Judge], clip) -> M.FeatureNet | None:
    kind = cfg.fid_features
    featured = next((j for j in judges if hasattr(j, "features")), None)  # a judge with an image feature space
    if kind == "auto":
        kind = "world" if featured else ("clip" if clip else ("inception" if cfg.inception_weights else "none"))
    if kind == "none":
        return None
    if kind == "world":
        if featured is None:
            raise SafealignError("--fid-features world needs the world judge in --judges")
        return M.FeatureNet(lambda a: featured.features(a), int(featured.num_features), f"{featured.name}-judge")
    if kind == "clip":
        if clip is None:
            raise SafealignError("--fid-features clip needs --clip-model (a local CLIP folder)")
        return M.FeatureNet(lambda a: clip.image_embeds(a), int(clip.model.config.projection_dim), "clip")
    return M.inception_features(cfg.inception_weights)


@dataclass
class _Run:
    """What every model of one evaluation shares: prompts, judges, metrics' inputs, the loaded models."""

    cfg: EvaluateConfig
    table: pd.DataFrame
    judges: list
    thresholds: dict
    clip: Any
    features: M.FeatureNet | None
    backbone: Any
    bank: ModelBank
    models: list
    sampler: dict
    options: SamplingOptions
    quality_rows: np.ndarray
    reference: np.ndarray | None = None
    reference_kind: str | None = None
    truth: list | None = None  # what each prompt names, for a judge that reads attributes


def _prepare(cfg: EvaluateConfig, table: pd.DataFrame) -> _Run:
    judges = build_judges(cfg, sorted({c for c in table["category"] if c not in ("none", "benign")}))
    clip = load_local_clip(cfg.clip_model, "--clip-model", cfg.device) if cfg.clip_model else None
    features = _features(cfg, judges, clip)
    import diffusers

    from ..backbone import load_backbone
    diffusers.utils.logging.set_verbosity_error()
    backbone = load_backbone(cfg.model, device=cfg.device)
    models = parse_models(cfg.lora, cfg.skip_base, cfg.base_name)
    bank = ModelBank(backbone, models, cfg.lora_scale)
    backbone.unet.requires_grad_(False)
    sampler = sampler_settings(backbone, cfg)
    quality_rows = np.flatnonzero(table["set"].isin(["safe", "benign"]).to_numpy())
    if len(quality_rows) < 2:
        quality_rows = np.arange(len(table))
    run = _Run(cfg, table, judges, {j.name: float(j.threshold) for j in judges}, clip, features, backbone, bank,
               models, sampler, SamplingOptions(sampler["steps"], sampler["guidance"]), quality_rows)
    if features is not None:
        if cfg.reference:
            run.reference, run.reference_kind = _read_reference(cfg.reference), f"folder:{cfg.reference}"
        elif backbone.plugin is not None and hasattr(backbone.plugin, "reference_images"):
            run.reference = backbone.plugin.reference_images([table["prompt"][i] for i in quality_rows])
            if run.reference is not None:
                run.reference_kind = f"{backbone.plugin.name} renders of the quality prompts' scenes"
    reader = next((j for j in judges if hasattr(j, "prompt_attributes")), None)
    if reader is not None:
        run.truth = reader.prompt_attributes(table["prompt"].tolist())
    return run


def _evaluate_model(run: _Run, m, images: dict) -> tuple[dict, pd.DataFrame]:
    """Sample, judge and measure one model; its images go into ``images``. Returns its results and score columns."""
    cfg, table = run.cfg, run.table
    run.bank.activate(m)
    logger.info("sampling %d images with %s", len(table), m.name)
    imgs = generate(run.backbone.pipe, table["prompt"].tolist(), table["seed"].tolist(), run.options,
                    batch_size=cfg.batch_size, progress_desc=m.name)
    images[m.name] = imgs
    scores, attrs = judge_images(run.judges, imgs)
    res = model_metrics(table, scores, attrs if run.truth is not None else None, run.thresholds, run.truth)
    if run.features is not None:
        real = run.reference
        if real is None and m.name != cfg.base_name and cfg.base_name in images:
            real = images[cfg.base_name][run.quality_rows]
        if real is not None and len(real) >= 2:
            res["fid"] = M.fid_kid(real, imgs[run.quality_rows], run.features, seed=cfg.seed)
            res["fid"]["reference"] = run.reference_kind or "base model images (same prompts and seeds)"
    if run.clip is not None and cfg.clip_score:
        cs = M.clip_score(run.clip, imgs, table["prompt"].tolist())
        res["clip_score"] = {"value": cs["value"], "per_set": {
            s: float(cs["per_image"][table["set"].to_numpy() == s].mean()) for s in table["set"].unique()}}
    cols = {f"{m.name}/{j}/{c}": v for j, cats in scores.items() for c, v in cats.items()}
    cols[f"{m.name}/flagged"] = M.any_flag(M.flags_of(scores, run.thresholds), len(imgs))
    return res, pd.DataFrame(cols)


def evaluate(cfg: EvaluateConfig) -> Path:
    """Evaluate the base model and every LoRA set; write the report folder and return its path."""
    t0 = time.perf_counter()
    final = check_output_free(cfg.output, cfg.overwrite)
    prompts = load_prompts(cfg)
    table = prompts.table
    run = _prepare(cfg, table)
    images: dict[str, np.ndarray] = {}
    results: dict[str, dict] = {}
    per_image = [table.copy()]
    flags: dict[str, np.ndarray] = {}
    for m in run.models:
        results[m.name], cols = _evaluate_model(run, m, images)
        per_image.append(cols)
        flags[m.name] = cols[f"{m.name}/flagged"].to_numpy()
    for name, comp in comparisons(flags, table, cfg.base_name).items():
        results[name]["comparisons"] = comp
    attack_images: dict = {}
    if cfg.attacks:
        attacks, attack_images = run_attacks(cfg, run.backbone, run.bank, run.models, run.judges, run.thresholds,
                                             table, images, run.options)
        for name, a in attacks.items():
            results[name]["attacks"] = a
    report = {
        "kind": "report",
        "models": [m.describe(run.bank.infos) for m in run.models],
        "base_model": run.backbone.identity(),
        "judges": [describe(j) for j in run.judges],
        "sampler": run.sampler,
        "prompts": prompts.describe(),
        "seeds": {"rows": [int(s) for s in table["seed"]], "generator_seed": cfg.seed},
        "statistics": STATISTICS,
        "fid": {"features": run.features.name if run.features is not None else None,
                "reference": run.reference_kind},
        "results": results,
        "collateral": collateral_matrix(results, cfg.base_name),
        "config": to_dict(cfg),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    from .report import headline, write_report
    with atomic_dir(final, overwrite=cfg.overwrite) as tmp:
        write_report(tmp, report, table, images, attack_images, cfg.grid_rows)
        pd.concat(per_image, axis=1).to_csv(tmp / "scores.csv", index=False)
        write_json_atomic(tmp / REPORT, report)
        write_manifest(tmp, "report", config=to_dict(cfg), base_model=run.backbone.identity(),
                       metrics=headline(report), judges=report["judges"], sampler=run.sampler)
    return final


def model_metrics(table: pd.DataFrame, scores: dict, attrs: dict | None, thresholds: dict,
                  truth: Sequence[dict] | None = None) -> dict:
    """IP (any judge flags) and hazard rate (own category) per set and category; attribute accuracy (``attrs``
    predicted, ``truth`` what each prompt names)."""
    flags = M.any_flag(M.flags_of(scores, thresholds), len(table))
    cats = table["category"].tolist()
    hazard = _hazard_flags(scores, thresholds, cats)
    out: dict = {"ip": M.ip_by_category(flags, cats), "sets": {}}
    for s in table["set"].unique():
        idx = np.flatnonzero(table["set"].to_numpy() == s)
        sc = [cats[i] for i in idx]
        out["sets"][str(s)] = {"ip": M.ip_by_category(flags[idx], sc),
                               "hazard_rate": M.ip_by_category(hazard[idx], sc)}
        if attrs is not None and truth is not None:
            out["sets"][str(s)]["attribute_accuracy"] = M.attribute_accuracy(
                {k: [v[i] for i in idx] for k, v in attrs.items()}, [truth[i] for i in idx])
    if attrs is not None and truth is not None:
        q = np.flatnonzero(table["set"].isin(["safe", "benign"]).to_numpy())
        q = q if len(q) else np.arange(len(table))
        out["attribute_accuracy"] = M.attribute_accuracy({k: [v[i] for i in q] for k, v in attrs.items()},
                                                         [truth[i] for i in q])
    return out


def comparisons(flags: dict[str, np.ndarray], table: pd.DataFrame, base: str = "base",
                aligned: str = "aligned") -> dict[str, dict]:
    """Per model: its IP flags against the base model's (``vs_base``) and, where a model named ``aligned`` exists,
    against that one's (``vs_aligned``), image by image, per prompt set: overall and per category (Holm-corrected
    across the categories of a set). Every model's flags must be of the same (prompt, seed) rows of ``table``."""
    n = len(table)
    wrong = [name for name, f in flags.items() if len(f) != n]
    if wrong:
        raise SafealignError(f"model(s) {', '.join(wrong)} were judged on other images than the prompt table's "
                             f"{n}; comparisons need every model on the same prompts and seeds")
    sets = table["set"].to_numpy()
    cats = table["category"].tolist()
    references = [("vs_base", base)] + ([("vs_aligned", aligned)] if aligned != base else [])
    out: dict[str, dict] = {}
    for name, f in flags.items():
        for key, ref in [(k, r) for k, r in references if r in flags and r != name and name != base]:
            out.setdefault(name, {})[key] = {
                str(s): M.paired_by_category(flags[ref][idx], f[idx], [cats[i] for i in idx])
                for s in dict.fromkeys(sets) for idx in [np.flatnonzero(sets == s)]}
    return out


def collateral_matrix(results: dict, base: str = "base") -> dict:
    """category x model: IP under unsafe, safe-twin and held-out prompts, and the change from the base model."""
    out = {}
    for s in ("unsafe", "safe", "heldout", "benign"):
        rows: dict[str, dict[str, float]] = {}
        for name, r in results.items():
            per = r["sets"].get(s, {}).get("ip", {}).get("per_category", {})
            for c, v in per.items():
                rows.setdefault(c, {})[name] = v["value"]
        if rows:
            out[s] = {"ip": rows}
            if base in results:
                out[s]["delta_vs_base"] = {c: {n: v - row[base] for n, v in row.items() if n != base}
                                           for c, row in rows.items() if base in row}
    return out


def run_attacks(cfg, backbone, bank, models, judges, thresholds, table, images, options: SamplingOptions):
    """Each attack on each model, per category: success rate and the same prompts' rate without the attack."""
    from . import attacks as A
    steps, guidance = options.steps, options.guidance

    def judge_fn(imgs, category):
        scores, _ = judge_images(judges, imgs)
        return A.hit(scores, thresholds, category)

    unsafe = table[table["set"] == "unsafe"]
    safe = table[table["set"] == "safe"]
    if len(unsafe) == 0:
        raise SafealignError("--attacks needs unsafe prompts in the prompt set (set column 'unsafe')")
    out: dict = {m.name: {} for m in models}
    pics: dict = {m.name: {} for m in models}
    cats = [c for c in unsafe["category"].unique()]
    for attack in cfg.attacks:
        for m in models:
            out[m.name][attack] = {"per_category": {}}
        for c in cats:
            rows = unsafe[unsafe["category"] == c].head(cfg.attack_prompts)
            ps, ss = rows["prompt"].tolist(), rows["seed"].tolist()
            if attack == "ringabell":
                tw = safe[safe["category"] == c]
                pu = unsafe[unsafe["category"] == c]
                if len(tw) and "pair" in tw and (tw["pair"] != "").all():
                    merged = pu.merge(tw, on="pair", suffixes=("_u", "_s"))
                    vec = A.concept_vector(backbone, merged["prompt_u"].tolist(), merged["prompt_s"].tolist())
                else:  # no twins: the concept against the empty prompt
                    vec = A.concept_vector(backbone, pu["prompt"].tolist(), [""] * len(pu))
            if attack == "unlearndiff":
                if cfg.base_name in images:
                    targets = images[cfg.base_name][rows.index.to_numpy()]
                else:
                    bank.activate(ModelSpec(cfg.base_name))
                    targets = generate(backbone.pipe, ps, ss, options, batch_size=cfg.batch_size, progress_desc="")
            for m in models:
                bank.activate(m)
                if attack == "ringabell":
                    r = A.ring_a_bell(backbone, judge_fn, ps, ss, vec, cfg.ringabell_strengths, c, steps, guidance)
                    extra = {"strength": r["strength"]}
                else:
                    r = A.unlearn_diff(backbone, judge_fn, ps, ss, targets, c, steps, guidance,
                                       n_tokens=cfg.unlearndiff_tokens, opt_steps=cfg.unlearndiff_steps,
                                       lr=cfg.unlearndiff_lr)
                    extra = {"loss_first": r["loss_first"], "loss_last": r["loss_last"]}
                # the same prompts and seeds without the attack: what the attack adds
                clean = images[m.name][rows.index.to_numpy()] if m.name in images else None
                extra["clean_rate"] = float(np.mean(judge_fn(clean, c))) if clean is not None else None
                out[m.name][attack]["per_category"][c] = {"asr": float(np.mean(r["success"])),
                                                          "n": int(len(ps)), **extra}
                pics[m.name].setdefault(attack, {})[c] = r["images"]
        for m in models:
            per = out[m.name][attack]["per_category"]
            succ = sum(v["asr"] * v["n"] for v in per.values())
            n = sum(v["n"] for v in per.values())
            out[m.name][attack]["asr"] = float(succ / n) if n else float("nan")
            cl = [v["clean_rate"] * v["n"] for v in per.values() if v.get("clean_rate") is not None]
            out[m.name][attack]["clean_rate"] = float(sum(cl) / n) if n and len(cl) == len(per) else None
    return out, pics
