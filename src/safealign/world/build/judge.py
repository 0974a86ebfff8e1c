"""Stage 2: the judge, trained in two rounds: renders alone, then with half of each batch round-tripped through
the VAE as it ships (at half the learning rate), so that it holds on the images the world model decodes."""

from __future__ import annotations

import threading

from ..judge import Judge, JudgeTrainer
from .common import SceneStream, torch_threads
from .config import WorldConfig
from .vae import vae_roundtrip


class Cancelled(Exception):
    """Raised inside a judge round run on a worker thread when the stage beside it failed."""


class JudgeStage:
    """The judge's trainer and its seeded scene stream. Made before the VAE stage starts: building the net draws
    from torch's global generator, which the VAE stage (on another thread) draws from too; training draws from the
    trainer's own generator only."""

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        self.stop = threading.Event()
        data = SceneStream(cfg.seed * 7 + 2)

        def batch(_step: int):
            if self.stop.is_set():
                raise Cancelled
            return data.batch(cfg.judge_batch)
        self.trainer = JudgeTrainer(batch, seed=cfg.seed + 1, progress_desc="judge")

    def renders_round(self, bar_position: int | None = None) -> None:
        """Round 1 on renders alone, on one thread wherever it runs: it needs no VAE, so it can run beside it."""
        with torch_threads(1):
            self.trainer.train(self.cfg.judge_steps, self.cfg.judge_lr, bar_position=bar_position)

    def roundtrip_round(self, vae) -> None:
        """Round 2: half of each batch round-tripped through ``vae`` (the VAE as it ships)."""
        self.trainer.train(self.cfg.judge_roundtrip_steps, self.cfg.judge_lr * 0.5,
                           roundtrip=lambda x: vae_roundtrip(vae, x), roundtrip_frac=0.5)

    def judge(self) -> Judge:
        return self.trainer.judge()
