"""Stage 3: the text encoder and UNet, trained jointly on the VAE as it ships.

DDPM epsilon loss with min-SNR weighting, on latents of scenes rendered and encoded once (:class:`LatentPool`);
training phrasings only, the prompt dropped (empty string) ``cond_dropout`` of the time so classifier-free guidance
works; a weight EMA ships. At the end every token training prompts never contain reads as the unknown token.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch

from ...errors import TrainingDiverged
from ...utils import progress
from .. import model as M
from ..scene import Scene, scene_prompt
from .common import SceneStream, lr_schedule, optimise
from .config import WorldConfig
from .text import make_text_encoder, pretrain_text_one_thread, unseen_to_unknown

logger = logging.getLogger(__name__)


class LatentPool:
    """``size`` training scenes rendered and encoded once (scaled latents); batches are drawn epoch by epoch in a
    seeded order, so each latent is seen ``steps * batch / size`` times, each time with a fresh prompt and noise."""

    def __init__(self, vae, size: int, seed: int, chunk: int = 256):
        data = SceneStream(seed)
        self.scenes: list[Scene] = []
        lats = []
        for start in progress(range(0, size, chunk), desc="latents"):
            x, scenes = data.batch(min(chunk, size - start))
            with torch.no_grad():
                lats.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
            self.scenes += scenes
        self.latents = torch.cat(lats)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.order = torch.empty(0, dtype=torch.long)

    def batch(self, n: int) -> tuple[torch.Tensor, list[Scene]]:
        while len(self.order) < n:
            self.order = torch.cat([self.order, torch.randperm(len(self.scenes), generator=self.gen)])
        idx, self.order = self.order[:n], self.order[n:]
        return self.latents[idx], [self.scenes[i] for i in idx.tolist()]


class EMA:
    """An exponential moving average of parameters, with the usual warm-up ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.n = 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def _latent_batches(cfg: WorldConfig, vae) -> Callable[[int], tuple[torch.Tensor, list[Scene]]]:
    """``batch(n) -> (scaled latents, scenes)``: from a :class:`LatentPool`, or rendered and encoded per batch."""
    pool = LatentPool(vae, cfg.unet_pool, cfg.seed * 7 + 13) if cfg.unet_pool else None
    if pool is not None:
        return pool.batch
    data = SceneStream(cfg.seed * 7 + 3)
    scale = vae.config.scaling_factor

    def batch(n: int) -> tuple[torch.Tensor, list[Scene]]:
        x, scenes = data.batch(n)
        with torch.no_grad():
            return vae.encode(x).latent_dist.mean * scale, scenes
    return batch


def _denoising_loss(unet, sched, snr: torch.Tensor, lat: torch.Tensor, cond: torch.Tensor, g: torch.Generator,
                    min_snr_gamma: float) -> torch.Tensor:
    """DDPM epsilon-prediction loss of one batch, min-SNR weighted per sample when ``min_snr_gamma`` > 0."""
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(lat),), generator=g)
    noisy = sched.add_noise(lat, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    err = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        s = snr[t]
        err = err * torch.clamp(s, max=min_snr_gamma) / s
    return err.mean()


def train_unet(cfg: WorldConfig, vae, tokenizer, text_encoder=None, text_metrics: dict | None = None):
    """Stage 3; returns (text encoder, UNet, metrics). ``text_encoder``: one stage 3a already trained
    (:func:`~.text.make_text_encoder` + :func:`~.text.pretrain_text_one_thread`); by default both run here."""
    if text_encoder is None:
        text_encoder = make_text_encoder(cfg, tokenizer)
        text_metrics = pretrain_text_one_thread(cfg, tokenizer, text_encoder)
    text_metrics = text_metrics or {}
    torch.manual_seed(cfg.seed + 3)
    unet = M.make_unet()
    sched = M.make_train_scheduler()
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, betas=(0.9, 0.99), weight_decay=0.01, fused=True)
    lr_sched = lr_schedule(opt, cfg.unet_steps, 150)
    batches = _latent_batches(cfg, vae)
    prng = random.Random(cfg.seed * 7 + 4)
    g = torch.Generator().manual_seed(cfg.seed * 7 + 5)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    unet.train()
    text_encoder.train()
    bar = progress(range(cfg.unet_steps), desc="unet")
    ema_loss = None
    for step in bar:
        lat, scenes = batches(cfg.unet_batch)
        prompts = ["" if prng.random() < cfg.cond_dropout else scene_prompt(s, prng) for s in scenes]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        loss = _denoising_loss(unet, sched, snr, lat, text_encoder(ids)[0], g, cfg.min_snr_gamma)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"world UNet loss became {loss.item()} at step {step}; lower --unet-lr")
        optimise(loss, opt, lr_sched, params)
        if ema is not None:
            ema.update()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
    if ema is not None:
        ema.copy_to_params()
    n_unseen = unseen_to_unknown(text_encoder, tokenizer)
    logger.info("%d token ids that training prompts never contain now read as the unknown token", n_unseen)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return text_encoder, unet, {"unet/final_loss": ema_loss, "text/unseen_as_unknown": n_unseen, **text_metrics}
