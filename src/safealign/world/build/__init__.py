"""Build the mini world from scratch: VAE, judge, text encoder + UNet, then measure everything.

``build(out_dir)`` is what ``safealign world build`` runs; it is seeded (same seed, same thread counts -> same
weights); ``quick=True`` shrinks every stage to seconds, for tests. Training images are rendered on the fly and
nothing is cached on disk. Stages, one module each:

1. :mod:`.vae` -- the VAE on ``vae_threads``; 1b, its decoder alone with the object's pixels weighted.
2. :mod:`.judge` -- the judge: renders alone (beside stage 1, :mod:`.schedule`), then with the VAE's round trip.
3a. :mod:`.text` -- the text encoder alone learns to name a prompt's object, colour, background and position
   (beside stage 1, after the judge's first round).
3. :mod:`.unet` -- text encoder + UNet jointly on the VAE as it ships.
4. :mod:`.quality` -- judge accuracy on held-out renders; the model's hazard rates and attribute accuracy on
   held-out phrasings at the default sampling settings.

:mod:`.package` writes the folder (``pipeline/`` + ``judge/``, atomically) and reads one for ``--reuse-vae-judge``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from .. import model as M
from .common import to_pixels, to_uint8, torch_threads
from .config import WorldConfig
from .package import load_vae_judge, parameter_counts, save_pipeline, write_manifests
from .quality import measure
from .schedule import vae_and_judge
from .text import make_text_encoder, pretrain_text_one_thread
from .unet import train_unet
from .vae import as_shipped, vae_roundtrip

logger = logging.getLogger(__name__)

__all__ = ["WorldConfig", "build", "measure", "as_shipped", "vae_roundtrip", "to_pixels", "to_uint8"]


def _vae_judge_and_text(cfg: WorldConfig, tokenizer, reuse_vae_judge: str | os.PathLike | None):
    """Stages 1-2 (and 3a beside them), or the VAE and judge of ``reuse_vae_judge`` (stage 3a then runs in
    :func:`train_unet`). Returns (vae, judge, text encoder or None, its metrics, metrics, timings, reuse record)."""
    if reuse_vae_judge is not None:
        vae, judge, metrics, reused = load_vae_judge(reuse_vae_judge)
        logger.info("VAE and judge reused from %s", reuse_vae_judge)
        return vae, judge, None, None, metrics, {}, reused
    # stage 3a needs no VAE: made here (its init draws from torch's global generator, which the VAE stage draws
    # from too) and trained beside the VAE, after the judge's first round
    text_encoder, text_metrics = make_text_encoder(cfg, tokenizer), {}

    def stage_3a(bar_position: int | None) -> None:
        text_metrics.update(pretrain_text_one_thread(cfg, tokenizer, text_encoder, bar_position))
    vae, judge, metrics, timings = vae_and_judge(cfg, also=stage_3a if cfg.text_pretrain_steps else None)
    return vae, judge, text_encoder, text_metrics, dict(metrics), dict(timings), None


def build(out_dir: str | os.PathLike | None = None, quick: bool = False, seed: int = 0, threads: int = 2,
          config: WorldConfig | None = None, reuse_vae_judge: str | os.PathLike | None = None,
          unet_steps: int | None = None) -> dict:
    """Train the world from scratch and write ``out_dir/{pipeline,judge}`` atomically; returns the manifest.

    Default ``out_dir``: the weights folder shipped in the package (overwritten). ``reuse_vae_judge``: take the VAE
    and judge of that world folder (stages 1-2 skipped; the manifest records where they came from and how they
    were built) and retrain only the text encoder + UNet. The VAE and judge are read into memory first, so it may
    be the folder being replaced. ``config`` overrides ``quick``, ``seed``, ``threads`` and ``unet_steps``.
    """
    from ...artifacts import atomic_dir
    from ..paths import WEIGHTS, write_checksums

    cfg = config or (WorldConfig.quick_config(seed) if quick else WorldConfig(seed=seed))
    if config is None and (threads != cfg.threads or unet_steps is not None):
        cfg = dataclasses.replace(cfg, threads=threads, unet_steps=cfg.unet_steps if unet_steps is None else unet_steps)
    out = Path(out_dir) if out_dir is not None else WEIGHTS
    t_all = time.perf_counter()
    with torch_threads(cfg.threads), atomic_dir(out, overwrite=True) as tmp:
        tokenizer = M.make_tokenizer()
        vae, judge, text_encoder, text_metrics, metrics, timings, reused = _vae_judge_and_text(
            cfg, tokenizer, reuse_vae_judge)

        t0 = time.perf_counter()
        logger.info("stage 3/4 text encoder + UNet (%d steps)", cfg.unet_steps)
        text_encoder, unet, mu = train_unet(cfg, vae, tokenizer, text_encoder, text_metrics)
        metrics.update(mu)
        timings["unet"] = time.perf_counter() - t0

        # save first (fp16 weights, a standard pipeline folder), then measure what ships
        save_pipeline(tmp / "pipeline", vae, text_encoder, tokenizer, unet)
        judge.save(tmp / "judge")
        t0 = time.perf_counter()
        logger.info("stage 4/4 quality")
        metrics.update(measure(tmp / "pipeline", tmp / "judge", cfg))
        timings["quality"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_all
        manifest = write_manifests(tmp, cfg, metrics, timings, parameter_counts(vae, text_encoder, unet, judge),
                                   reused)
        write_checksums(tmp)  # checked whenever the shipped weights are loaded
    logger.info("done in %.0f s -> %s", time.perf_counter() - t_all, out)
    return manifest
