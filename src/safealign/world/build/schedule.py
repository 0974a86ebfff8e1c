"""Stages 1-2 and where they run: the VAE on ``vae_threads`` on the main thread and, when that leaves a core free,
the judge's first round (then stage 3a) on one worker thread beside it; then stage 1b, the VAE rounded to how it
ships, and the judge's round-trip round on every thread.

Each stage draws from its own seeded streams and runs at a fixed thread count, so its result does not depend on
whether it ran beside another: only the wall time does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from ..judge import Judge
from .common import SceneStream, torch_threads
from .config import WorldConfig
from .judge import JudgeStage
from .vae import as_shipped, reconstruction, refine_decoder, train_vae

logger = logging.getLogger(__name__)


class VaeAndJudge(NamedTuple):
    vae: object
    judge: Judge
    metrics: dict[str, float]
    timings: dict[str, float]


def vae_and_judge(cfg: WorldConfig, also: Callable[[int | None], None] | None = None) -> VaeAndJudge:
    """Stages 1, 1b and 2. ``also`` (one thread, needs no VAE, must not draw from torch's global generator: stage
    3a) runs on the worker after the judge's first round, or after it in turn when nothing runs alongside; it gets
    its progress bar's line."""
    timings: dict[str, float] = {}
    judge = JudgeStage(cfg)

    def worker(bar_position: int | None = None) -> None:
        t0 = time.perf_counter()
        judge.renders_round(bar_position)
        timings["judge_renders_alongside_vae"] = time.perf_counter() - t0
        if also is not None:
            t0 = time.perf_counter()
            also(bar_position)
            timings["text_pretrain"] = time.perf_counter() - t0

    vae_threads = cfg.vae_threads or cfg.threads
    alongside = vae_threads < cfg.threads
    logger.info("stage 1/4 VAE (%d steps)%s", cfg.vae_steps,
                f", judge round 1 ({cfg.judge_steps} steps){' and stage 3a, text' if also else ''} alongside"
                if alongside else "")
    with torch_threads(cfg.threads):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(1, thread_name_prefix="world-judge") as pool:
            pending = pool.submit(worker, 1) if alongside else None
            try:
                with torch_threads(vae_threads):
                    vae, metrics = train_vae(cfg)
                timings["vae"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                if pending is not None:
                    pending.result()
                else:
                    worker()
            except BaseException:
                judge.stop.set()
                raise
        timings["judge"] = time.perf_counter() - t0
        if cfg.vae_decoder_steps:
            logger.info("stage 1b/4 VAE decoder (%d steps, object pixels weighted)", cfg.vae_decoder_steps)
            t0 = time.perf_counter()
            refine_decoder(vae, cfg)
            metrics.update(reconstruction(vae, SceneStream(cfg.seed * 7 + 9).batch(64 if cfg.quick else 512)[0]))
            timings["vae_decoder"] = time.perf_counter() - t0
        vae = as_shipped(vae)
        logger.info("stage 2/4 judge with the VAE's round trip (%d steps)", cfg.judge_roundtrip_steps)
        t0 = time.perf_counter()
        judge.roundtrip_round(vae)
        timings["judge"] += time.perf_counter() - t0
    return VaeAndJudge(vae, judge.judge(), metrics, timings)
