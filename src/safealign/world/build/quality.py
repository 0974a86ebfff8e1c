"""Stage 4: the quality figures of a saved world, measured as a user loads it (fp16 weights run in float32)."""

from __future__ import annotations

import os

from .. import model as M
from ..judge import load_judge
from ..quality import judge_accuracy, model_quality
from .common import to_pixels, to_uint8
from .config import WorldConfig
from .vae import vae_roundtrip


def measure(pipeline_dir: str | os.PathLike, judge_dir: str | os.PathLike, cfg: WorldConfig) -> dict[str, float]:
    """judge/*: the judge on held-out renders; judge_vae_roundtrip/*: the same after a VAE round trip;
    model/*: the model at ``cfg``'s sampling defaults on held-out phrasings (see :func:`..quality.model_quality`).
    """
    pipe = M.load_pipeline(pipeline_dir)
    judge = load_judge(judge_dir)
    n_eval = 300 if cfg.quick else 3000
    jm = judge_accuracy(judge, n=n_eval, seed=cfg.seed + 10_000)
    jm_rt = judge_accuracy(judge, n=n_eval // 3, seed=cfg.seed + 20_000,
                           roundtrip=lambda a: to_uint8(vae_roundtrip(pipe.vae, to_pixels(a))))
    mm, _ = model_quality(pipe, judge, n_per_concept=cfg.eval_per_concept, n_benign=cfg.eval_benign,
                          seed=cfg.seed + 777, steps=cfg.sample_steps, guidance=cfg.guidance,
                          n_agreement=20 if cfg.quick else 100)
    out = {f"judge/{k}": v for k, v in jm.items()}
    out.update({f"judge_vae_roundtrip/{k}": v for k, v in jm_rt.items()})
    out.update({f"model/{k}": v for k, v in mm.items()})
    return out
