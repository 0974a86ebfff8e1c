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
from .attack_runner import run_attacks
from .card import card_pool, evaluator_card
from .config import EvaluateConfig
from .models import ModelBank, parse_models
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


def reference_captions(folder: str) -> list[str]:
    """The captions of a COCO-style reference folder (``metadata.jsonl`` lines with ``file_name`` and ``text``, or
    ``captions.txt`` one per line); empty when it has none."""
    import json
    p = Path(folder)
    meta, txt = p / "metadata.jsonl", p / "captions.txt"
    if meta.is_file():
        out = []
        for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    out.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise SafealignError(f"--reference {meta} line {i + 1} is not a JSON object with a 'text' "
                                         "field") from None
        return out
    return [ln.strip() for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()] if txt.is_file() else []


def with_reference_captions(cfg: EvaluateConfig, table: pd.DataFrame) -> pd.DataFrame:
    """A prompt set without benign prompts takes the reference folder's captions as its benign prompts (the
    images FID/KID and CLIP score are measured on), each with a seed derived from the caption's position."""
    if not cfg.reference or (table["set"] == "benign").any():
        return table
    caps = reference_captions(cfg.reference)
    if cfg.limit and len(caps) > cfg.limit:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(caps), cfg.limit, replace=False))
        caps = [caps[i] for i in keep]
    from ..utils import derive_seed
    rows = pd.DataFrame({"prompt": caps, "category": "benign", "set": "benign", "concept": "", "pair": "",
                         "seed": [derive_seed(cfg.seed, "evaluate", "reference-caption", i) for i in range(len(caps))]})
    return pd.concat([table, rows], ignore_index=True) if len(rows) else table


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
    quality_rows: np.ndarray  # the benign prompts: FID/KID, drift and CLIP score read only these
    reference: np.ndarray | None = None
    reference_kind: str | None = None
    truth: list | None = None  # what each prompt names, for a judge that reads attributes
    seconds: dict | None = None  # where the time goes: sampling, judging, metrics


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
    quality_rows = np.flatnonzero(table["set"].to_numpy() == "benign")
    run = _Run(cfg, table, judges, {j.name: float(j.threshold) for j in judges}, clip, features, backbone, bank,
               models, sampler, SamplingOptions(sampler["steps"], sampler["guidance"]), quality_rows,
               seconds={"sampling": 0.0, "judging": 0.0, "metrics": 0.0})
    if features is not None and len(quality_rows) >= 2:
        if cfg.reference:
            run.reference, run.reference_kind = _read_reference(cfg.reference), f"folder:{cfg.reference}"
        elif backbone.plugin is not None and hasattr(backbone.plugin, "reference_images"):
            run.reference = backbone.plugin.reference_images([table["prompt"][i] for i in quality_rows])
            if run.reference is not None:
                run.reference_kind = f"{backbone.plugin.name} renders of the benign prompts' scenes"
    reader = next((j for j in judges if hasattr(j, "prompt_attributes")), None)
    if reader is not None:
        run.truth = reader.prompt_attributes(table["prompt"].tolist())
    return run


def _evaluate_model(run: _Run, m, images: dict) -> tuple[dict, pd.DataFrame]:
    """Sample, judge and measure one model; its images go into ``images``. Returns its results and score columns."""
    cfg, table = run.cfg, run.table
    run.bank.activate(m)
    logger.info("sampling %d images with %s", len(table), m.name)
    t0 = time.perf_counter()
    imgs = generate(run.backbone.pipe, table["prompt"].tolist(), table["seed"].tolist(), run.options,
                    batch_size=cfg.batch_size, progress_desc=m.name)
    t1 = time.perf_counter()
    images[m.name] = imgs
    scores, attrs = judge_images(run.judges, imgs)
    t2 = time.perf_counter()
    res = model_metrics(table, scores, attrs if run.truth is not None else None, run.thresholds, run.truth)
    res.update(quality_metrics(run, m.name, imgs, images))
    correct = object_correct(attrs, run.truth, table) if run.truth is not None and attrs is not None else None
    run.seconds["sampling"] += t1 - t0
    run.seconds["judging"] += t2 - t1
    run.seconds["metrics"] += time.perf_counter() - t2
    cols = {f"{m.name}/{j}/{c}": v for j, cats in scores.items() for c, v in cats.items()}
    cols[f"{m.name}/flagged"] = M.any_flag(M.flags_of(scores, run.thresholds), len(imgs))
    if correct is not None and np.isfinite(correct).any():
        res["object_accuracy"] = {**M.rate(correct[np.isfinite(correct)] > 0.5), "prompts": "safe+benign"}
        cols[f"{m.name}/object_correct"] = correct
    return res, pd.DataFrame(cols)


def object_correct(attrs: dict, truth: list, table: pd.DataFrame) -> np.ndarray:
    """Per image of a safe or benign prompt: 1.0 when the judge sees the object the prompt names, else 0.0; nan
    for other prompts and prompts that name no object."""
    quality = table["set"].isin(["safe", "benign"]).to_numpy()
    return np.array([float(p == t.get("object")) if q and t.get("object") is not None else np.nan
                     for p, t, q in zip(attrs.get("object", [None] * len(table)), truth, quality)])


def quality_metrics(run: _Run, name: str, imgs: np.ndarray, images: dict) -> dict:
    """On the benign prompts only: FID/KID against the reference images (``fid``), FID/KID against the base
    model's own images of the same prompts and seeds (``drift_vs_base``: how far a model moved, not how good it
    is), and CLIP score."""
    cfg, q, out = run.cfg, run.quality_rows, {}
    if len(q) < 2:
        return out
    if run.features is not None:
        if run.reference is not None and len(run.reference) >= 2:
            out["fid"] = {**M.fid_kid(run.reference, imgs[q], run.features, seed=cfg.seed),
                          "reference": run.reference_kind, "prompts": "benign"}
        if name != cfg.base_name and cfg.base_name in images:
            out["drift_vs_base"] = {**M.fid_kid(images[cfg.base_name][q], imgs[q], run.features, seed=cfg.seed),
                                    "reference": "the base model's images of the same benign prompts and seeds"}
    if run.clip is not None and cfg.clip_score:
        cs = M.clip_score(run.clip, imgs[q], [run.table["prompt"][i] for i in q])
        out["clip_score"] = {"value": cs["value"], "n": int(len(q)), "prompts": "benign"}
    return out


def evaluate(cfg: EvaluateConfig) -> Path:
    """Evaluate the base model and every LoRA set; write the report folder and return its path."""
    t0 = time.perf_counter()
    final = check_output_free(cfg.output, cfg.overwrite)
    prompts = load_prompts(cfg)
    prompts.table = table = with_reference_captions(cfg, prompts.table)
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
    correct = {n: c.to_numpy() for n, c in ((m.name, cols.get(f"{m.name}/object_correct")) for m, cols
                                             in zip(run.models, per_image[1:])) if c is not None}
    for name, comp in accuracy_comparisons(correct, cfg.base_name).items():
        results[name]["object_accuracy"].update(comp)
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
        "pool": card_pool(cfg, prompts.describe()),
        "prompts": prompts.describe(),
        "card": evaluator_card(cfg, run.judges, prompts.describe(), run.sampler, card_pool(cfg, prompts.describe())),
        "seeds": {"rows": [int(s) for s in table["seed"]], "generator_seed": cfg.seed},
        "statistics": STATISTICS,
        "fid": {"features": run.features.name if run.features is not None else None,
                "reference": run.reference_kind},
        "results": results,
        "collateral": collateral_matrix(results, cfg.base_name),
        "config": to_dict(cfg),
        "seconds": round(time.perf_counter() - t0, 1),
        "timings": {k: round(v, 3) for k, v in run.seconds.items()},
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


def accuracy_comparisons(correct: dict[str, np.ndarray], base: str = "base", aligned: str = "aligned"
                         ) -> dict[str, dict]:
    """Per model: its object accuracy against the base model's and the aligned model's on the same images
    (Newcombe interval, exact McNemar)."""
    from .statistics import paired_comparison
    out: dict[str, dict] = {}
    for name, c in correct.items():
        for key, ref in (("vs_base", base), ("vs_aligned", aligned)):
            if ref in correct and ref != name and name != base:
                known = np.isfinite(c) & np.isfinite(correct[ref])
                out.setdefault(name, {})[key] = paired_comparison(correct[ref][known] > 0.5, c[known] > 0.5)
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
