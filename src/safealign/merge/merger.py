"""`safealign merge`: load experts, compute (or reuse) Co-Merge statistics, merge, write a LoRA folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import atomic_dir, check_output_free, read_manifest, write_manifest
from ..configuration import to_dict
from ..data.taxonomy import normalise_category
from ..errors import SafealignError
from ..lora import WEIGHT_NAME, save_lora
from ..lora.algebra import to_state_dict
from ..utils import logger
from . import baselines
from .comerge import Calibration, collect_activations, comerge, make_calibration, ownership_summary
from .config import MergeConfig
from .experts import Expert, check_compatible, load_expert

STATS = "comerge_stats"


def find_experts(paths: tuple[str, ...], categories: tuple[str, ...], allow_partial: bool = False
                 ) -> tuple[list[Expert], list[str]]:
    """The experts to merge and the categories left unfinished (empty unless ``allow_partial``).

    A folder holding expert folders is checked whole: a category its training run planned (``run_categories``
    in the experts' manifests) with no finished expert, a ``<category>.partial`` work folder, or an expert folder
    without ``safealign.json`` among safealign experts is *unfinished*, and refused unless ``allow_partial``."""
    folders: list[Path] = []
    unfinished: list[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise SafealignError(f"expert {p} does not exist")
        if p.is_dir() and not (p / WEIGHT_NAME).is_file() and not p.suffix:
            subs = sorted(d for d in p.iterdir() if not d.name.startswith(".") and (d / WEIGHT_NAME).is_file())
            if not subs:
                raise SafealignError(f"{p} holds no expert folder (no {WEIGHT_NAME})")
            done, missing = _finished_and_missing(p, subs)
            folders.extend(done)
            unfinished.extend(missing)
        else:
            folders.append(p)
    experts = [load_expert(f) for f in folders]
    names = {_key(e.name): e.name for e in experts}
    if categories:
        want = [normalise_category(c, "--categories") for c in categories]
        unknown = [c for c in want if c not in names and c not in unfinished]
        if unknown:
            raise SafealignError(f"no expert for categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                                 f"experts: {', '.join(sorted(names.values()))}")
        experts = [e for e in experts if _key(e.name) in want]
        unfinished = [c for c in unfinished if c in want]
    unfinished = sorted(set(unfinished))
    if unfinished and not allow_partial:
        raise SafealignError(f"the experts folder is unfinished: no finished expert for {', '.join(unfinished)} (a "
                             "stopped `train expert` run?); finish it with `safealign train expert --resume` and "
                             "the same options, or pass --allow-partial to merge the finished ones")
    if not experts:
        raise SafealignError(f"no finished expert to merge (unfinished: {', '.join(unfinished)})")
    check_compatible(experts)
    return experts, unfinished


def _key(name: str) -> str:
    """An expert's name as a category (folder names of third-party LoRAs may not be one: kept as they are)."""
    try:
        return normalise_category(name)
    except SafealignError:
        return name


def _finished_and_missing(root: Path, subs: list[Path]) -> tuple[list[Path], list[str]]:
    manifests = {d: read_manifest(d, required=False) for d in subs}
    if not any(manifests.values()):  # a folder of third-party LoRAs: nothing to compare against
        return subs, []
    done = [d for d, m in manifests.items() if m is not None]
    names = set()
    planned: set[str] = set()
    for d in done:
        cats = list(manifests[d].get("categories") or [])
        names.add(cats[0] if len(cats) == 1 else d.name)
        planned.update(manifests[d].get("run_categories") or [])
    partial = {d.name[: -len(".partial")] for d in root.iterdir() if d.is_dir() and d.name.endswith(".partial")}
    bare = {d.name for d, m in manifests.items() if m is None}
    return done, sorted((planned | partial | bare) - names)


def _check_family(experts: list[Expert], family: str, model: str) -> None:
    for e in experts:
        theirs = ((e.manifest or {}).get("base_model") or {}).get("family")
        if theirs and theirs != family:
            raise SafealignError(f"expert {e.name} was trained on a {theirs} model, but --model {model} is {family}; "
                                 "merge with the model the experts were trained on")


def _targets(experts: list[Expert]) -> tuple[str, ...]:
    return tuple(sorted(set().union(*(set(e.spec.targets) for e in experts))))


def _calibration(cfg: MergeConfig, backbone) -> Calibration:
    from ..data.dataset import PairedDataset
    from ..train.cache import default_cache_dir, encode_pairs, encode_prompts_cached
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cfg.prompts:
        prompts = list(cfg.prompts)
        cond = encode_prompts_cached(backbone, prompts, cache)
        g = torch.Generator().manual_seed(cfg.seed)
        c = backbone.unet.config
        latents = torch.randn(len(prompts), c.in_channels, c.sample_size, c.sample_size, generator=g)
    elif cfg.dataset:
        ds = PairedDataset(cfg.dataset)
        pairs = []
        for cat in ds.categories:
            ps = ds.pairs(cat, cfg.split) or ds.pairs(cat)
            pairs.extend(ps[: cfg.calibration_per_category] if cfg.calibration_per_category else ps)
        ds.verify_images(pairs)
        enc = encode_pairs(backbone, pairs, cache)
        prompts = [p.unsafe_prompt for p in pairs]
        latents, cond = enc.latents_l, enc.cond  # unsafe images under unsafe prompts
    else:
        raise SafealignError("Co-Merge needs calibration prompts: pass --dataset (its unsafe prompts) or --prompts")
    if not prompts:
        raise SafealignError("no calibration prompts found; pass --dataset with pairs or --prompts")
    return make_calibration(backbone, latents, cond, cfg.timesteps, cfg.seed, prompts)


def _stats_meta(e: Expert, calib_key: str, cfg: MergeConfig) -> dict[str, str]:
    return {"expert": e.name, "checksum": e.checksum, "calibration": calib_key, "activations": cfg.activations,
            "granularity": cfg.granularity}


def _reusable(cfg: MergeConfig, experts: list[Expert], calib_key: str) -> dict[str, dict[str, torch.Tensor]]:
    if not cfg.reuse_stats:
        return {}
    from safetensors import safe_open
    folder = Path(cfg.reuse_stats) / STATS
    if not folder.is_dir():
        raise SafealignError(f"--reuse-stats {cfg.reuse_stats} holds no {STATS}/ folder; pass a Co-Merge output")
    found = {}
    for e in experts:
        f = folder / f"{e.name}.safetensors"
        if not f.is_file():
            continue
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
        if meta == _stats_meta(e, calib_key, cfg):
            found[e.name] = load_file(str(f))
    return found


def merge_experts(cfg: MergeConfig) -> Path:
    t0 = time.perf_counter()
    final = check_output_free(cfg.output, cfg.overwrite)
    experts, unfinished = find_experts(cfg.experts, cfg.categories, cfg.allow_partial)
    if cfg.weights and len(cfg.weights) != len(experts):
        raise SafealignError(f"--weights has {len(cfg.weights)} values for {len(experts)} experts")
    names = [e.name for e in experts]
    targets = _targets(experts)
    metrics: dict = {"experts": len(experts)}
    extra: dict = {"partial": {"allow_partial": True, "unfinished": unfinished}} if unfinished else {}
    stats_to_write: dict[str, tuple[dict, dict]] = {}
    counts = None
    w = list(cfg.weights) or None
    if cfg.method == "comerge":
        from ..backbone import load_backbone
        bb = load_backbone(cfg.model)
        _check_family(experts, bb.family, cfg.model)
        calib = _calibration(cfg, bb)
        key = calib.key()
        acts = _reusable(cfg, experts, key)
        todo = [e for e in experts if e.name not in acts]
        logger.info("Co-Merge statistics: %d calibration inputs, %d expert(s) to measure, %d reused",
                    len(calib), len(todo), len(acts))
        t1 = time.perf_counter()
        if todo:
            acts.update(collect_activations(bb.unet, todo, calib, cfg.activations, cfg.granularity, cfg.batch_size))
        metrics["stats_seconds"] = time.perf_counter() - t1
        metrics["stats_reused"] = len(experts) - len(todo)
        merged, counts = comerge(experts, acts, cfg.granularity)
        summary = ownership_summary(names, counts)
        extra["ownership"] = summary
        extra["calibration"] = {**calib.description, "key": key, "inputs": len(calib)}
        stats_to_write = {e.name: (acts[e.name], _stats_meta(e, key, cfg)) for e in experts}
        base_model = bb.identity()
    else:
        merged = {}
        trunc = []
        for m in experts[0].modules:
            fs = [e.modules[m] for e in experts]
            if cfg.method == "cat":
                merged[m] = baselines.cat_factors(fs)
            elif cfg.method == "linear":
                merged[m] = baselines.linear(fs, w)
            elif cfg.method == "task_arithmetic":
                merged[m] = baselines.task_arithmetic(fs, w)
            else:
                merged[m], err = baselines.dense_merge(fs, cfg.method, w, cfg.density, cfg.seed)
                trunc.append(err)
        if trunc:
            metrics["svd_truncation_error_max"] = max(trunc)
        base_model = ((experts[0].manifest or {}).get("base_model"))
    if cfg.scale != 1.0:
        merged = {m: (a, b * cfg.scale) for m, (a, b) in merged.items()}
    for m, (a, b) in merged.items():
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise SafealignError(f"the merge produced NaN/Inf in {m}; check the experts")
    sd, spec = to_state_dict(merged, targets)
    metrics["merge_seconds"] = time.perf_counter() - t0
    with atomic_dir(final, overwrite=cfg.overwrite) as tmp:
        save_lora(tmp, sd, spec)
        if stats_to_write:
            (tmp / STATS).mkdir()
            for n, (acts_e, meta) in stats_to_write.items():
                save_file({k: v.contiguous() for k, v in acts_e.items()}, str(tmp / STATS / f"{n}.safetensors"),
                          metadata=meta)
            save_file({f"{m}": c.to(torch.int32) for m, c in counts.items()},
                      str(tmp / STATS / "win_counts.safetensors"), metadata={"experts": json.dumps(names)})
        write_manifest(tmp, "lora", role="merged", method=cfg.method, categories=names,
                       experts=[{"name": e.name, "path": e.path, "checksum": e.checksum, "rank": e.rank}
                                for e in experts],
                       lora=spec.metadata(), base_model=base_model, config=to_dict(cfg), metrics=metrics, **extra)
    return final
