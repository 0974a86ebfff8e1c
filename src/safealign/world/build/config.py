"""How the mini world is built: one frozen config for every stage of :func:`safealign.world.build.build`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...configuration import field
from ...errors import SafealignError
from .. import model as M


@dataclass(frozen=True)
class WorldConfig:
    """How the world is built. ``quick`` shrinks every stage to seconds (for tests), not for use."""

    seed: int = field(0, "seed for every stage (renders, init, noise, evaluation)")
    quick: bool = field(False, "tiny run for tests: seconds per stage, the weights are not usable")
    threads: int = field(2, "torch CPU threads")
    vae_threads: int = field(1, "torch CPU threads of stage 1 alone (0 = threads): the thread count changes the "
                                "float summation order, so the VAE (and every stage trained on its latents) is "
                                "reproduced bit for bit only at the same count; 1 is what the shipped VAE used")
    vae_steps: int = field(600, "VAE optimisation steps")
    vae_batch: int = field(32, "VAE batch size")
    vae_lr: float = field(1e-3, "VAE peak learning rate")
    vae_decoder_steps: int = field(200, "steps of stage 1b: the decoder alone, object pixels weighted")
    vae_object_weight: float = field(4.0, "stage 1b: extra reconstruction weight on the object's pixels (its colour "
                                          "is an attribute; the plain background dominates an unweighted loss)")
    judge_steps: int = field(1200, "judge steps on renders alone (on one thread, alongside the one-thread VAE stage)")
    judge_roundtrip_steps: int = field(200, "then judge steps with half of each batch round-tripped through the VAE "
                                            "(at half the learning rate)")
    judge_batch: int = field(64, "judge batch size")
    judge_lr: float = field(2e-3, "judge peak learning rate")
    text_pretrain_steps: int = field(300, "stage 3a: steps teaching the text encoder to name a prompt's object, "
                                          "colour, background and position before the UNet trains on it (0 = off)")
    text_pretrain_lr: float = field(2e-3, "stage 3a peak learning rate")
    unet_pool: int = field(32000, "stage 3: render and encode this many scenes once and draw the UNet's batches from "
                              "them (each with a fresh prompt and noise); 0 = render and encode every batch")
    unet_steps: int = field(4000, "UNet + text encoder optimisation steps")
    unet_batch: int = field(32, "UNet batch size")
    unet_lr: float = field(1.2e-3, "UNet + text encoder peak learning rate")
    ema_decay: float = field(0.999, "decay of the weight EMA that ships (0 = ship the last weights)")
    cond_dropout: float = field(0.1, "probability of training with the empty prompt (for classifier-free guidance)")
    min_snr_gamma: float = field(5.0, "min-SNR loss weighting (0 = off)")
    sample_steps: int = field(M.DEFAULT_STEPS, "default DPM-Solver++ steps recorded in the pipeline")
    guidance: float = field(M.DEFAULT_GUIDANCE, "default classifier-free guidance recorded in the pipeline")
    eval_per_concept: int = field(6, "held-out prompt pairs per hazard concept in the quality check")
    eval_benign: int = field(96, "held-out benign prompts in the quality check")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise SafealignError(f"world config {f.name} must be >= 0, got {v}")
        if not 0 <= self.ema_decay < 1:
            raise SafealignError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.cond_dropout < 1:
            raise SafealignError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")

    @classmethod
    def quick_config(cls, seed: int = 0) -> WorldConfig:
        return cls(seed=seed, quick=True, vae_steps=30, vae_decoder_steps=10, vae_batch=16, judge_steps=20,
                   judge_roundtrip_steps=10, judge_batch=32, text_pretrain_steps=10, unet_pool=64, unet_steps=30,
                   unet_batch=16, sample_steps=4, eval_per_concept=1, eval_benign=8)

    def default(self) -> WorldConfig:
        """The config ``world build`` uses at this seed (quick or not): what the recorded command is relative to."""
        return WorldConfig.quick_config(self.seed) if self.quick else WorldConfig(seed=self.seed)
