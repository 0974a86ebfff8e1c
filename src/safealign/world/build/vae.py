"""Stage 1: the VAE (AutoencoderKL 32x32x3 -> 8x8x4), then stage 1b: its decoder alone, object pixels weighted.

Stage 1 trains the whole VAE with L1 + MSE reconstruction and a tiny KL; the latent scaling factor is then set so
scaled latents have unit variance, as in SD. Stage 1b retrains only the decoder so object colours come back as
drawn; the encoder, and so every latent later stages learn from, stays as stage 1 left it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...utils import progress
from .. import model as M
from ..render import object_mask
from ..scene import Scene
from .common import SceneStream, lr_schedule, optimise
from .config import WorldConfig


def train_vae(cfg: WorldConfig):
    """Stage 1: a fresh VAE trained on renders; returns it (eval, frozen) and its metrics."""
    torch.manual_seed(cfg.seed)
    vae = M.make_vae()
    data = SceneStream(cfg.seed * 7 + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = lr_schedule(opt, cfg.vae_steps, 50)
    vae.train()
    bar = progress(range(cfg.vae_steps), desc="vae")
    for step in bar:
        x, _ = data.batch(cfg.vae_batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        optimise(loss, opt, sched, vae.parameters())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    # SD convention: scaled latents have unit variance (the encoder's alone: stage 1b leaves it as it is)
    x, _ = data.batch(64 if cfg.quick else 512)
    with torch.no_grad():
        std = vae.encode(x).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=float(1.0 / max(std, 1e-6)))
    return vae, {"vae/latent_std": std, **reconstruction(vae, x)}


def reconstruction(vae, x: torch.Tensor) -> dict[str, float]:
    """The VAE's mean absolute round-trip error on pixels ``x`` in [-1, 1], as a fraction of the pixel range."""
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return {"vae/reconstruction_mae": float((rec - x).abs().mean() / 2)}


def object_weights(scenes: list[Scene], extra: float) -> torch.Tensor:
    """(N, 1, H, W) per-pixel loss weights: 1 on the background, 1 + ``extra`` on the object (anti-aliased)."""
    m = np.stack([object_mask(s) for s in scenes])
    return torch.from_numpy(1.0 + extra * m).unsqueeze(1)


def refine_decoder(vae, cfg: WorldConfig) -> None:
    """Stage 1b: retrain the decoder alone with the object's pixels weighted ``1 + vae_object_weight``.

    Unweighted, the plain background dominates the loss and object colours drift. Only the decoder learns: the
    encoder and the latent scale (fixed before this stage) stay as they are, so the latents the text encoder and
    UNet learn from are the same with or without it. It draws from its own seeded scene stream and noise generator.
    """
    data = SceneStream(cfg.seed * 7 + 7)
    g = torch.Generator().manual_seed(cfg.seed * 7 + 8)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr * 0.5, weight_decay=0.0)
    steps = cfg.vae_decoder_steps
    sched = lr_schedule(opt, steps, 20)
    bar = progress(range(steps), desc="vae decoder")
    for step in bar:
        x, scenes = data.batch(cfg.vae_batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        rec = vae.decode(z).sample
        w = object_weights(scenes, cfg.vae_object_weight)
        loss = (((rec - x).abs() + (rec - x).pow(2)) * w).sum() / (w.sum() * x.shape[1])
        optimise(loss, opt, sched, params)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def as_shipped(module: torch.nn.Module) -> torch.nn.Module:
    """Round ``module``'s weights to fp16 -- the precision they ship in -- keeping float32 for compute.

    The stages after the VAE learn from the VAE a user loads: the UNet its latents, the judge its round trip. The
    fp16 rounding moves every latent slightly, so a whole build and a ``--reuse-vae-judge`` build on the saved VAE
    give the same text encoder and UNet only if both train on the rounded weights.
    """
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(torch.float16).to(t.dtype))
    return module


def vae_roundtrip(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode (mean) and decode pixels in [-1, 1] -- how the world model's decoder degrades images."""
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
