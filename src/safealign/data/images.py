"""Paired images: each pair's unsafe and safe prompt rendered by the model being aligned, same seed and settings.

- **Batched**: several pairs per pipeline call, one ``torch.Generator`` per image seeded with the pair's seed, so an
  image does not depend on which other pairs share its call.
- **Deterministic sharding**: the pairs are cut into fixed batches in file order and batch ``b`` goes to rank
  ``b % world_size`` (``accelerate launch --num_processes N``); a batch has the same members whatever the number of
  processes, so 1 and 2 processes write the same pixels.
- **Resumable**: everything happens in ``<output>.partial``. Images are written to a temp name and renamed; a pair
  counts as done only once its line is in a rank's ``done-*.jsonl`` log (written after both images, flushed and
  fsynced). A re-run skips done batches and rewrites anything else, so a run killed midway, even one that left a
  half-written file, ends with every pair exactly once.
- **Judge filter** (optional): keep a pair only if the judge flags its unsafe image for the pair's category and not
  its safe image (:func:`safealign.judges.flags`: score >= the judge's threshold); the kept fraction per category
  is recorded.
- Rank 0 assembles the dataset (pairs.parquet, SHA256SUMS, safealign.json) and renames the folder into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..artifacts import atomic_dir, check_output_free, read_manifest
from ..configuration import to_dict
from ..errors import SafealignError
from ..judges import Judge, as_judge, flags, load_judge
from ..names import contained
from ..sampling import SamplingOptions, generate, to_pil
from ..utils import logger, progress, sha256_file, sha256_text
from .config import ImagesConfig
from .dataset import finalize_dataset, load_image
from .prompts import read_prompts
from .splits import check_no_leakage

RUN_FILE = "run.json"
DONE_GLOB = "done-*.jsonl"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_pairs(df: pd.DataFrame, categories: tuple[str, ...], max_per_category: int) -> pd.DataFrame:
    """The pairs to render, in render order: some categories only, at most N per category, interleaved (the i-th
    pair of every concept of every category, then the (i+1)-th...). More pairs per concept in the prompts file, or
    a larger N, only append to this order, so a run stopped short resumes and re-renders nothing.
    ``_file_row`` keeps the file order for the written table."""
    from .taxonomy import normalise_category
    df = df.assign(_file_row=np.arange(len(df)))
    if categories:
        have = list(dict.fromkeys(df["category"]))
        want = [normalise_category(c) for c in categories]
        unknown = [c for c, w in zip(categories, want) if w not in have]
        if unknown:
            raise SafealignError(f"unknown category {unknown[0]!r}; the prompts file has {', '.join(have)}")
        df = df[df["category"].isin(want)]
    cat_order = {c: i for i, c in enumerate(dict.fromkeys(df["category"]))}
    con_order = {k: i for i, k in enumerate(dict.fromkeys(zip(df["category"], df["concept"])))}
    df = df.assign(_i=df.groupby(["category", "concept"], sort=False).cumcount(),
                   _c=[cat_order[c] for c in df["category"]],
                   _k=[con_order[k] for k in zip(df["category"], df["concept"])])
    df = df.sort_values(["_i", "_c", "_k", "_file_row"], kind="stable").drop(columns=["_i", "_c", "_k"])
    if max_per_category:
        df = df[df.groupby("category", sort=False).cumcount() < max_per_category]
    return df.reset_index(drop=True)


def sampling_settings(backbone, cfg: ImagesConfig) -> dict:
    """Steps and guidance (the config's, else the model's own), size and scheduler, as the dataset records them."""
    opts = cfg.sampling.resolve(backbone.sampling_defaults())
    size = cfg.resolution or backbone.resolution
    return {"steps": opts.steps, "guidance": opts.guidance, "height": size, "width": size,
            "scheduler": type(backbone.pipe.scheduler).__name__}


def render_pairs(pipe, unsafe: list[str], safe: list[str], seeds: list[int], settings: dict
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Unsafe and safe images (uint8) of a batch of pairs in one pipeline call; image i of each side uses seed[i]."""
    k = len(unsafe)
    ims = generate(pipe, list(unsafe) + list(safe), list(seeds) * 2,
                   SamplingOptions(settings["steps"], settings["guidance"]), batch_size=max(2 * k, 1),
                   height=settings["height"], width=settings["width"])
    return ims[:k], ims[k:]


def judge_scores(judge: Judge, images, categories: list[str]) -> np.ndarray:
    """Score of each image for its own category (``categories[i]`` for image i)."""
    scores = judge(images)
    res = np.empty(len(categories), np.float64)
    for c in dict.fromkeys(categories):
        if c not in scores:
            raise SafealignError(f"judge {judge.name} has no score for category {c!r}; it scores "
                                 f"{', '.join(sorted(scores))}")
    for i, c in enumerate(categories):
        res[i] = float(np.asarray(scores[c])[i])
    return res


def _save_png(im, path: Path) -> str:
    """Write atomically (temp name, fsync, rename); return the file's sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        im.save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def read_done(work: Path) -> dict[str, dict]:
    """pair_id -> record from every rank's log; a torn last line (a kill mid-write) is ignored."""
    done: dict[str, dict] = {}
    for log in sorted(work.glob(DONE_GLOB)):
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["pair_id"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def pair_signature(unsafe: str, safe: str, seed: int) -> str:
    """What a pair's images depend on besides the run settings (a record with another signature is stale)."""
    return sha256_text(json.dumps([str(unsafe), str(safe), int(seed)]))[:16]


def _is_done(rec: dict | None, work: Path, sig: str) -> bool:
    """Logged for this pair's prompts and seed, and both images on disk exactly as written (a file damaged or
    replaced since is rendered again)."""
    if rec is None or rec.get("sig") != sig:
        return False
    for side in ("unsafe", "safe"):
        path = contained(work / rec[f"{side}_image"], work, "a logged image")
        if not path.is_file() or sha256_file(path) != rec.get(f"{side}_sha256"):
            return False
    return True


def _run_key(backbone, settings: dict, cfg: ImagesConfig, judge: Judge | None) -> dict:
    """What every image depends on: a re-run may resume only a work folder made with the same key (the pairs
    themselves are checked one by one through their signatures, so the selection may grow)."""
    return {"model": backbone.fingerprint(), "settings": settings, "batch_size": cfg.batch_size,
            "dtype": cfg.dtype, "judge": cfg.judge,
            "judge_threshold": judge.threshold if judge is not None else cfg.judge_threshold}


def _prepare_work(work: Path, key: dict, restart: bool) -> None:
    if restart and work.exists():
        shutil.rmtree(work)
    (work / "images").mkdir(parents=True, exist_ok=True)
    run = work / RUN_FILE
    if run.is_file():
        try:
            old = json.loads(run.read_text())
        except json.JSONDecodeError:
            old = None
        if old != key:
            raise SafealignError(f"{work} holds an earlier run with other prompts or settings; pass --restart to "
                                 "discard it, or rerun with the same options to resume")
    else:
        run.write_text(json.dumps(key, indent=1))


def _render_batch(pipe, judge, rows: pd.DataFrame, settings: dict, work: Path) -> list[str]:
    """Render, judge and write one batch of pairs; return their done-log lines."""
    u_ims, s_ims = render_pairs(pipe, rows["unsafe_prompt"].tolist(), rows["safe_prompt"].tolist(),
                                rows["seed"].tolist(), settings)
    k = len(rows)
    scores = (judge_scores(judge, np.concatenate([u_ims, s_ims]), rows["category"].tolist() * 2)
              if judge is not None else None)
    u_ims, s_ims = to_pil(u_ims), to_pil(s_ims)
    lines = []
    for j, (pid, u_im, s_im) in enumerate(zip(rows["pair_id"], u_ims, s_ims)):
        rec = {"pair_id": pid, "sig": rows["_sig"].iloc[j], "unsafe_image": f"images/{pid}_u.png",
               "safe_image": f"images/{pid}_s.png"}
        rec["unsafe_sha256"] = _save_png(u_im, work / rec["unsafe_image"])
        rec["safe_sha256"] = _save_png(s_im, work / rec["safe_image"])
        if scores is not None:
            rec["judge_unsafe"], rec["judge_safe"] = float(scores[j]), float(scores[k + j])
        lines.append(json.dumps(rec))
    return lines


def _close_torn_line(log: Path) -> None:
    """End a line torn by a kill, or the next record appended would be glued to it (and lost)."""
    if log.is_file() and log.stat().st_size:
        with open(log, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _render_share(pipe, judge, df: pd.DataFrame, batches: list[list[int]], settings: dict, work: Path, state,
                  on_batch: Callable[[int], None] | None, rendered: int = 0) -> list[dict]:
    """Render this rank's batches; after each, append its records to the rank's log (flushed, fsynced)."""
    import diffusers
    log_path = work / f"done-rank{state.process_index}.jsonl"
    _close_torn_line(log_path)
    prev = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # CLIP truncation notices, once per batch, are noise
    records = []
    try:
        with open(log_path, "a") as log:
            desc = "pairs" if state.num_processes == 1 else f"pairs (rank {state.process_index})"
            for b in progress(batches, desc=desc, disable=None if state.is_main_process else True):
                lines = _render_batch(pipe, judge, df.iloc[b], settings, work)
                log.write("\n".join(lines) + "\n")
                log.flush()
                os.fsync(log.fileno())
                records += [json.loads(ln) for ln in lines]
                if on_batch is not None:
                    on_batch(rendered + len(records))
    finally:
        diffusers.utils.logging.set_verbosity(prev)
    return records


def _kept(judge: Judge, unsafe_scores, safe_scores) -> np.ndarray:
    """A pair is kept when the judge flags its unsafe image and not its safe one (scores for the pair's category)."""
    return (flags(judge, np.atleast_1d(np.asarray(unsafe_scores, np.float64)))
            & ~flags(judge, np.atleast_1d(np.asarray(safe_scores, np.float64))))


def _target_status(df: pd.DataFrame, is_done: list[bool], done: dict, target: int, judge: Judge
                   ) -> dict[str, tuple[bool, int, list[int]]]:
    """Per category, walking its pairs in render order: (satisfied, pairs in the prefix, indices of the first
    ``target`` kept pairs). Satisfied: the first pairs up to the target-th kept one are all rendered, or the
    category's pairs are exhausted. Depends only on the images, not on the order they were rendered in."""
    out = {}
    for cat, idx in df.groupby("category", sort=False).indices.items():
        kept: list[int] = []
        n, ok = 0, True
        for i in idx:
            if len(kept) >= target:
                break
            if not is_done[i]:
                ok = False
                break
            n += 1
            rec = done[df.at[i, "pair_id"]]
            if _kept(judge, rec["judge_unsafe"], rec["judge_safe"])[0]:
                kept.append(int(i))
        out[cat] = (ok, n, kept)
    return out


def _render_to_target(pipe, judge, df: pd.DataFrame, is_done: list[bool], done: dict, cfg: ImagesConfig,
                      settings: dict, work: Path, state, on_batch) -> int:
    """Render in rounds of ``world_size`` batches, each taken in render order from the categories not yet
    satisfied, until every category has ``target`` kept pairs in its rendered prefix (or runs out). Returns the
    number of pairs this process rendered."""
    from accelerate.utils import gather_object
    is_done = list(is_done)
    rendered = 0
    bs, world = cfg.batch_size, state.num_processes
    with progress(total=cfg.target_kept_per_category * df["category"].nunique(), desc="kept pairs",
                  disable=None if state.is_main_process else True) as bar:
        while True:
            status = _target_status(df, is_done, done, cfg.target_kept_per_category, judge)
            bar.n = sum(len(k) for _, _, k in status.values())
            bar.refresh()
            todo = [i for i in range(len(df)) if not is_done[i] and not status[df.at[i, "category"]][0]]
            if not todo:
                return rendered
            rnd = todo[:bs * world]
            batches = [rnd[j:j + bs] for j in range(0, len(rnd), bs)]
            mine = batches[state.process_index:state.process_index + 1]
            own = _render_share(pipe, judge, df, mine, settings, work, state, on_batch, rendered)
            rendered += len(own)
            for r in ([r for part in gather_object([own]) for r in part] if world > 1 else own):
                done[r["pair_id"]] = r
            for i in rnd:
                is_done[i] = True


def use_cpu() -> bool:
    """CPU processes (gloo) when there is no GPU or ``--cpu`` was given: PartialState needs to be told, or
    ``accelerate launch --multi_gpu`` / ``torchrun`` workers on a CPU machine would each run alone."""
    from accelerate.utils import parse_flag_from_env
    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def generate_images(cfg: ImagesConfig, *, backbone=None, judge=None,
                    on_batch: Callable[[int], None] | None = None) -> tuple[Path, dict]:
    """Render every pair (this process's share under Accelerate); rank 0 writes the dataset. Returns
    (output folder, stats)."""
    from accelerate import PartialState

    from ..backbone import load_backbone
    t0 = time.perf_counter()
    state = PartialState(cpu=use_cpu())
    final = Path(cfg.output)
    work = final.with_name(final.name + ".partial")
    check_output_free(final, cfg.overwrite)
    df = select_pairs(read_prompts(cfg.prompts), cfg.categories, cfg.max_pairs_per_category)
    check_no_leakage(df, f"prompts file {cfg.prompts}")
    if backbone is None:
        backbone = load_backbone(cfg.model, device=state.device, dtype=DTYPES[cfg.dtype])
    if judge is not None:
        judge = as_judge(judge, cfg.judge or "callable", cfg.judge_threshold)
    elif cfg.judge:
        judge = load_judge(cfg.judge, threshold=cfg.judge_threshold, device=str(state.device))
    settings = sampling_settings(backbone, cfg)
    if judge is not None:  # a judge that cannot score every category fails now, before any work is written
        cats = list(dict.fromkeys(df["category"]))
        judge_scores(judge, np.zeros((len(cats), settings["height"], settings["width"], 3), np.uint8), cats)
    key = _run_key(backbone, settings, cfg, judge)
    if state.is_main_process:
        _prepare_work(work, key, cfg.restart)
    state.wait_for_everyone()
    if not state.is_main_process and json.loads((work / RUN_FILE).read_text()) != key:
        raise SafealignError(f"{work} was prepared for another run; rerun with the same options")

    done = read_done(work)
    state.wait_for_everyone()  # every rank has read the logs before any rank appends to them
    df["_sig"] = [pair_signature(u, s, k) for u, s, k in zip(df["unsafe_prompt"], df["safe_prompt"], df["seed"])]
    is_done = [_is_done(done.get(p), work, g) for p, g in zip(df["pair_id"], df["_sig"])]
    # fixed batches over the render order: batch b goes to rank b % world_size whatever was done before, so
    # a batch has the same members under any number of processes (a resumed batch renders only what is missing)
    n, bs = len(df), cfg.batch_size
    mine = [[i for i in range(b, min(b + bs, n)) if not is_done[i]] for b in range(0, n, bs)]
    mine = [b for bi, b in enumerate(mine) if b and bi % state.num_processes == state.process_index]
    skipped = sum(is_done)
    if skipped and state.is_main_process:
        logger.info("resuming: %d of %d pairs already rendered in %s", skipped, n, work)
    t_gen = time.perf_counter()
    if cfg.target_kept_per_category:
        rendered = _render_to_target(backbone.pipe, judge, df, is_done, done, cfg, settings, work, state, on_batch)
    else:
        rendered = len(_render_share(backbone.pipe, judge, df, mine, settings, work, state, on_batch))
    gen_seconds = time.perf_counter() - t_gen
    # the slowest rank's time is the run's
    from accelerate.utils import gather_object
    times = gather_object([(rendered, gen_seconds)]) if state.num_processes > 1 else [(rendered, gen_seconds)]
    state.wait_for_everyone()
    stats: dict = {}
    if state.is_main_process:
        stats = _assemble(cfg, df, work, final, backbone, settings, key, judge,
                          timing={"seconds_total": time.perf_counter() - t0,
                                  "seconds_generating": max(t for _, t in times),
                                  "pairs_rendered_this_run": sum(r for r, _ in times),
                                  "pairs_resumed": skipped, "processes": state.num_processes})
    state.wait_for_everyone()
    return final, stats


def _assemble(cfg: ImagesConfig, df: pd.DataFrame, work: Path, final: Path, backbone, settings: dict, key: dict,
              judge: Judge | None, timing: dict) -> dict:
    done = read_done(work)
    is_done = [_is_done(done.get(p), work, g) for p, g in zip(df["pair_id"], df["_sig"])]
    target = cfg.target_kept_per_category
    if target:  # only the rendered prefix of each category counts; the first `target` kept pairs are the dataset
        status = _target_status(df, is_done, done, target, judge)
        if not all(ok for ok, _, _ in status.values()):
            raise SafealignError("some pairs have no valid images; a process failed or a file was damaged. Rerun "
                                 "the same command to finish them")
        chosen = {i for _, _, k in status.values() for i in k}
        df = df[[is_done[i] for i in range(len(df))]]
    else:
        missing = [p for p, ok in zip(df["pair_id"], is_done) if not ok]
        if missing:
            raise SafealignError(f"{len(missing)} pair(s) have no valid images (e.g. {missing[0]!r}); a process "
                                 "failed or a file was damaged. Rerun the same command to finish them")
    df = df.sort_values("_file_row").copy()
    for side in ("unsafe", "safe"):
        df[f"{side}_image"] = [done[p][f"{side}_image"] for p in df["pair_id"]]
    keep = pd.Series(True, index=df.index)
    judge_info = None
    if cfg.judge:
        df["judge_unsafe"] = [done[p]["judge_unsafe"] for p in df["pair_id"]]
        df["judge_safe"] = [done[p]["judge_safe"] for p in df["pair_id"]]
        keep = pd.Series(_kept(judge, df["judge_unsafe"], df["judge_safe"]), index=df.index)
        per_cat = {}
        for cat, sub in df.groupby("category", sort=False):
            k, n = int(keep[sub.index].sum()), len(sub)
            if target:  # the fraction over the pairs it took to reach the target (rendered beyond: not judged)
                n, k = status[cat][1], len(status[cat][2])
            per_cat[cat] = {"generated": n, "kept": k, "fraction": round(k / max(n, 1), 4)}
        if target:
            keep = pd.Series([i in chosen for i in df.index], index=df.index)
        judge_info = {"judge": cfg.judge, "threshold": judge.threshold, "kept_per_category": per_cat,
                      "kept": int(keep.sum()), "generated": sum(v["generated"] for v in per_cat.values()),
                      "target_per_category": target or None}
        if not keep.any():
            raise SafealignError(f"the judge {cfg.judge} kept no pair (it never flags the unsafe image and not the "
                                 "safe one); check the judge, the model and --judge-threshold")
    need = max(cfg.min_kept_per_category, target)
    kept_per_cat = df[keep].groupby("category", sort=False).size().reindex(df["category"].unique(), fill_value=0)
    short = {c: int(k) for c, k in kept_per_cat.items() if k < need}
    if short:  # nothing is deleted: a rerun with more pairs reuses every image rendered so far
        raise SafealignError(
            f"{len(short)} categor{'y' if len(short) == 1 else 'ies'} kept fewer than {need} "
            f"pairs ({', '.join(f'{c} {k}' for c, k in short.items())}); rerun with a larger "
            f"--max-pairs-per-category or more prompts: the {len(df)} pairs rendered in {work} are reused")
    dropped, df = df[~keep], df[keep]
    for side in ("unsafe_image", "safe_image"):  # a kept-out pair's images stay out of the dataset
        for rel in dropped[side]:
            (work / rel).unlink(missing_ok=True)
    for f in list(work.glob(DONE_GLOB)) + [work / RUN_FILE]:
        f.unlink(missing_ok=True)
    wanted = set(df["unsafe_image"].str[len("images/"):]) | set(df["safe_image"].str[len("images/"):])
    for p in (work / "images").iterdir():  # temp files and strays (pairs rendered earlier, no longer selected)
        if p.name not in wanted:
            p.unlink()
    df = df.drop(columns=["_sig", "_file_row"])
    secs = max(timing["seconds_generating"], 1e-9)
    timing["images_per_second"] = round(2 * timing["pairs_rendered_this_run"] / secs, 3)
    metrics = {"timing": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing.items()}}
    if judge_info:
        metrics["judge_filter"] = judge_info
    with atomic_dir(final, cfg.overwrite, work=work) as w:
        finalize_dataset(w, df, generator=backbone.identity(), config=to_dict(cfg), metrics=metrics,
                         sampler=settings, run_key=key, source_prompts=str(cfg.prompts))
    per_cat = df.groupby("category", sort=False).size()
    return {"pairs": len(df), "per_category": {k: int(v) for k, v in per_cat.items()}, **metrics}


def verify_dataset_images(folder: Path) -> None:
    """Every image of a written dataset decodes (used by tests and `data images` callers that want to check)."""
    read_manifest(folder, "dataset")
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        load_image(folder / line.split("  ", 1)[1])
