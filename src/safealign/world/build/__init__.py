"""Build the mini world from scratch: VAE, judge, text encoder + UNet, then measure everything.

``build(out_dir)`` is what ``safealign world build`` runs; it is seeded (same seed, same machine -> same weights)
and takes about 25-30 minutes on 2 CPU cores, depending on the machine's speed (``quick=True``: about a minute,
for tests). Training images are rendered on the fly (a render costs ~0.1 ms) and nothing is cached on disk; the
UNet draws its batches from a pool of scenes rendered and encoded once (:class:`_LatentPool`).

Stages:
1. VAE (AutoencoderKL 32x32x3 -> 8x8x4) on one thread: L1 + MSE reconstruction, a tiny KL; the latent scaling
   factor is set so scaled latents have unit variance, as in SD. Then (1b, every thread) the decoder alone with
   the object's pixels weighted, so colours come back as drawn (:func:`refine_decoder`).
2. Judge: renders + degradations on one thread, alongside stage 1 (which leaves a core idle); then a short round
   with half of each batch round-tripped through the VAE as it ships (fp16 weights, :func:`as_shipped`).
3a. Text encoder alone, on that same idle core after the judge's first round: linear heads on its states learn to
   name the prompt's object, colour, background and position (:func:`pretrain_text`), so the UNet starts from an
   encoder that already reads scenes.
3. Text encoder + UNet (on the VAE as it ships), jointly, DDPM epsilon loss with min-SNR weighting; training
   phrasings only, the prompt dropped (empty string) 10% of the time so classifier-free guidance works; at the end
   every token training prompts never contain is given the unknown token's embedding (:func:`unseen_to_unknown`).
4. Quality: judge accuracy on held-out renders; hazard rates and attribute accuracy of the model on held-out
   phrasings at the default sampling settings; judge vs nearest-render agreement on generated images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...configuration import field, to_dict
from ...errors import SafealignError
from ...utils import progress
from .. import model as M
from ..render import object_mask, render_batch
from ..scene import BACKGROUNDS, COLOURS, OBJECTS, POSITIONS, Scene, parse_prompt, sample_scene, scene_prompt

logger = logging.getLogger("safealign")


@dataclass(frozen=True)
class WorldConfig:
    """How the world is built. ``quick`` shrinks every stage to seconds (for tests), not for use."""

    seed: int = field(0, "seed for every stage (renders, init, noise, evaluation)")
    quick: bool = field(False, "tiny run for tests: seconds per stage, the weights are not usable")
    threads: int = field(2, "torch CPU threads")
    vae_threads: int = field(1, "torch CPU threads of stage 1 alone (0 = threads): thread count changes the float "
                                "summation order, and the VAE decides how well the UNet can learn; 1 thread gives "
                                "the shipped VAE bit for bit, 2 gave one the UNet learned far worse from")
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
    word_dropout: float = field(0.0, "probability that a filler word (not an object, colour, background or "
                                      "position) is replaced by the unknown token in training")
    unk_insert: float = field(0.0, "probability of inserting an unknown token at a random place in a training prompt")
    text_positions: bool = field(False, "learn the text encoder's position embeddings (off: fixed at zero, word "
                                       "order is carried by the causal mask alone and a word reads the same at "
                                       "every position; see without_positions)")
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
        for name in ("word_dropout", "unk_insert"):
            if not 0 <= getattr(self, name) < 1:
                raise SafealignError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.cond_dropout < 1:
            raise SafealignError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")

    @classmethod
    def quick_config(cls, seed: int = 0) -> "WorldConfig":
        return cls(seed=seed, quick=True, vae_steps=30, vae_decoder_steps=10, vae_batch=16, judge_steps=20,
                   judge_roundtrip_steps=10,
                   judge_batch=32, text_pretrain_steps=10, unet_pool=64, unet_steps=30, unet_batch=16,
                   sample_steps=4, eval_per_concept=1, eval_benign=8)


def _to_pixels(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _cosine(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _optimise(loss: torch.Tensor, opt, lr_sched, params) -> None:
    """One optimisation step of every training loop here: backward, clip the gradient norm at 1, step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    lr_sched.step()


class _Scenes:
    """Random training scenes (rendered on the fly) from one seeded stream."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, list[Scene]]:
        scenes = [sample_scene(self.rng) for _ in range(n)]
        return _to_pixels(render_batch(scenes)), scenes


def _object_weights(scenes: list[Scene], extra: float) -> torch.Tensor:
    """(N, 1, H, W) per-pixel loss weights: 1 on the background, 1 + ``extra`` on the object (anti-aliased)."""
    m = np.stack([object_mask(s) for s in scenes])
    return torch.from_numpy(1.0 + extra * m).unsqueeze(1)


# -- stage 1: VAE -----------------------------------------------------------------------------------------------
def train_vae(cfg: WorldConfig):
    torch.manual_seed(cfg.seed)
    vae = M.make_vae()
    data = _Scenes(cfg.seed * 7 + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.vae_steps, min(50, cfg.vae_steps)))
    vae.train()
    bar = progress(range(cfg.vae_steps), desc="vae")
    for step in bar:
        x, _ = data.batch(cfg.vae_batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        _optimise(loss, opt, sched, vae.parameters())
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


def refine_decoder(vae, cfg: WorldConfig) -> None:
    """Stage 1b: retrain the decoder alone with the object's pixels weighted ``1 + vae_object_weight``.

    Unweighted, the plain background dominates the loss and object colours drift (yellow came back orange: the
    judge read 9% of round-tripped colours wrong). Training the whole VAE weighted fixes colour but gives busier
    latents that the UNet learned objects from far worse (object accuracy 52% -> 37% against this decoder-only
    stage, both with word dropout on), so the encoder -- the latent space the UNet models -- stays as it is, and
    only the decoder learns to paint it back.

    It brings round-tripped colours back: on the session-8 VAE, 200 steps took the judge's colour accuracy on
    round-tripped renders from 91% to 96% (yellow had come back orange), before the judge's own round-trip round.
    It runs after stage 1 on every thread, from its own seeded scene stream and noise generator, and the latent
    scaling factor is fixed before it: the encoder, its scale and so the text encoder and UNet trained on them are
    the same with or without it -- only how latents are painted back changes. (An earlier whole build with it
    measured worse; there the latent scale was measured after stage 1b, on other scenes, so that build's UNet
    learned from slightly different latents as well.)
    """
    data = _Scenes(cfg.seed * 7 + 7)
    g = torch.Generator().manual_seed(cfg.seed * 7 + 8)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr * 0.5, weight_decay=0.0)
    steps = cfg.vae_decoder_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, min(20, steps)))
    bar = progress(range(steps), desc="vae decoder")
    for step in bar:
        x, scenes = data.batch(cfg.vae_batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        rec = vae.decode(z).sample
        w = _object_weights(scenes, cfg.vae_object_weight)
        loss = (((rec - x).abs() + (rec - x).pow(2)) * w).sum() / (w.sum() * x.shape[1])
        _optimise(loss, opt, sched, params)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def as_shipped(module: torch.nn.Module) -> torch.nn.Module:
    """Round ``module``'s weights to fp16 -- the precision they ship in -- keeping float32 for compute.

    The stages after the VAE must learn from the VAE as it ships: the UNet learns the latents of the encoder a user
    loads, and the judge the round trip a user's images go through. Trained on the float32 VAE still in memory, the
    text encoder and UNet of a whole build came out different from those of a ``--reuse-vae-judge`` build on the
    same (shipped) VAE, 0.41 apart at worst and with other figures (held-out benign-prompt hazards 11.5% against
    2.1%): the fp16 rounding alone moves every latent slightly, and 3,200 steps carry that far. With it, a whole
    build's text encoder and UNet are the shipped ones, tensor for tensor.
    """
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(torch.float16).to(t.dtype))
    return module


def vae_roundtrip(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode (mean) and decode pixels in [-1, 1] -- how the world model's decoder degrades images."""
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)


# -- stage 3: text encoder + UNet -------------------------------------------------------------------------------
def training_token_ids(tokenizer) -> set[int]:
    """The token ids training prompts can contain: the words of the training phrasings, every object, colour and
    background word, and the special tokens (the unknown token among them)."""
    from ..scene import all_phrasing_strings
    texts = [re.sub(r"\{\w+\}", " ", t) for t in all_phrasing_strings(held_out=False)]  # punctuation too
    texts += list(OBJECTS) + list(COLOURS) + list(BACKGROUNDS) + ["a", "an"]
    ids = {i for t in texts for i in tokenizer(t, add_special_tokens=False).input_ids}
    return ids | {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}


@torch.no_grad()
def unseen_to_unknown(text_encoder, tokenizer) -> int:
    """Give every token that training prompts never contain the unknown token's embedding; returns how many.

    A word the text encoder never met in training (our held-out phrasings have some: "huge", "illustration",
    "centre") otherwise keeps its random initial embedding and steers the model somewhere arbitrary; read as the
    unknown token -- what a tokenizer that did not know the word would give -- it is passed over. On the world
    shipped before pooled text conditioning this lifted the hazard rate under held-out unsafe prompts from 77.8% to
    86.5% and object accuracy from 75.9% to 82.7%, with no retraining.
    """
    emb = text_encoder.get_input_embeddings().weight
    seen = training_token_ids(tokenizer)
    unk = tokenizer.unk_token_id
    unseen = [i for i in range(emb.shape[0]) if i not in seen]
    emb[unseen] = emb[unk].clone()
    return len(unseen)


@torch.no_grad()
def without_positions(text_encoder) -> None:
    """Fix the text encoder's position embeddings at zero (and frozen): the encoder then reads word order from its
    causal attention mask alone, so a word means the same thing at whatever position a phrasing puts it.

    With learned positions, training phrasings put the object word at token positions 2-8 only; the held-out
    phrasing that names the background first puts it at 8-12, positions whose embeddings only ever carried
    trailing background words, and the model drew the named hazard 32% of the time there against 90-94% for
    every other held-out phrasing. Retrained this way (same VAE and judge, 3,200 steps) every phrasing came out
    at 87-91% (held-out 89.7% overall, object accuracy 84.3%), but hazards under benign prompts rose from 2.1% to
    15.6% (arrows drawn as syringes). That was under-training: at 6,400 steps the same model drew no hazard under
    benign prompts and the named hazard in 97.6% of held-out unsafe prompts (88.1% with learned positions), so it
    is the default (``text_positions=False``).
    """
    emb = getattr(text_encoder, "text_model", text_encoder).embeddings.position_embedding.weight
    emb.zero_()
    emb.requires_grad_(False)


class _Prompts:
    """Token ids for training prompts, optionally with unknown-word augmentation (off by default).

    ``word_dropout`` replaces a filler word by the tokenizer's unknown token, ``unk_insert`` inserts an unknown
    token at a random place; the words that carry the scene (object, colour, background, position) are never
    touched. Meant to teach the model to read around unknown words, it made the world model worse (held-out
    unsafe-prompt hazard rate 74.6% -> 63.5%, object accuracy 67.7% -> 52.4% at 0.15 / 0.3), so it stays off.
    """

    def __init__(self, tokenizer, cfg: WorldConfig, rng: random.Random):
        self.tok, self.cfg, self.rng = tokenizer, cfg, rng
        self.unk = tokenizer.unk_token_id
        self.pad = tokenizer.pad_token_id
        keep_words = set(OBJECTS) | set(COLOURS) | set(BACKGROUNDS) | set(POSITIONS) | {"middle"}
        self.keep = {i for w in keep_words for i in tokenizer(w, add_special_tokens=False).input_ids}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        n = self.tok.model_max_length
        if not (self.cfg.word_dropout or self.cfg.unk_insert):
            return self.tok(prompts, padding="max_length", max_length=n, truncation=True,
                            return_tensors="pt").input_ids
        out = []
        for ids in self.tok(prompts, add_special_tokens=True).input_ids:
            bos, inner, eos = ids[0], ids[1:-1], ids[-1]
            if inner:
                inner = [self.unk if t not in self.keep and self.rng.random() < self.cfg.word_dropout else t
                         for t in inner]
                if self.rng.random() < self.cfg.unk_insert:
                    inner.insert(self.rng.randint(0, len(inner)), self.unk)
            row = ([bos] + inner)[:n - 1] + [eos]
            out.append(row + [self.pad] * (n - len(row)))
        return torch.tensor(out)


class _EMA:
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


_POSITION_LABELS = tuple(POSITIONS) + ("unnamed",)


def _prompt_labels(prompts: list[str]) -> torch.Tensor:
    """(N, 4) class indices of the object, colour, background and position (or "unnamed") each prompt names."""
    rows = []
    for p in prompts:
        a = parse_prompt(p)
        rows.append([OBJECTS.index(a["object"]), list(COLOURS).index(a["colour"]),
                     list(BACKGROUNDS).index(a["background"]), _POSITION_LABELS.index(a["position"] or "unnamed")])
    return torch.tensor(rows)


def _summary_states(text_encoder, ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder states of the end token and every pad after it (under the causal mask, the only states that
    have read the whole prompt) as (M, H), with the row index each came from."""
    states = text_encoder(ids)[0]
    eos_pos = (ids == eos_id).int().argmax(dim=1)
    keep = torch.arange(ids.shape[1]).unsqueeze(0) >= eos_pos.unsqueeze(1)
    return states[keep], keep.nonzero()[:, 0]


def pretrain_text(cfg: WorldConfig, tokenizer, text_encoder, bar_position: int | None = None) -> dict[str, float]:
    """Stage 3a: teach the text encoder to read a scene before the UNet learns to draw from it.

    Linear heads on the states that have read the whole prompt (the end token and the pads after it) learn to
    name its object, colour, background and position; the heads are thrown away. Text alone, no images: a
    fraction of a UNet step each. Returns the heads' accuracy on held-out phrasings (unseen words read as the
    unknown token, as in the shipped model). With it (300 steps) 4,000 UNet steps drew the named hazard in 100% of
    held-out unsafe prompts, 1.6% of safe twins, colour 96.2%; without, 6,400 steps gave 97.6%, 2.4%, 94.7%.
    """
    import copy

    hidden = text_encoder.config.hidden_size
    gen = torch.Generator().manual_seed(cfg.seed * 7 + 11)
    # plain tensors from our own generator: nn.Linear would initialise from torch's global one, which the VAE
    # stage draws from on the other thread when this runs beside it
    sizes = (len(OBJECTS), len(COLOURS), len(BACKGROUNDS), len(_POSITION_LABELS))
    heads = [((torch.randn(n, hidden, generator=gen) * hidden ** -0.5).requires_grad_(),
              torch.zeros(n, requires_grad=True)) for n in sizes]
    params = [p for p in text_encoder.parameters() if p.requires_grad] + [t for h in heads for t in h]
    opt = torch.optim.AdamW(params, lr=cfg.text_pretrain_lr, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _cosine(s, cfg.text_pretrain_steps, min(50, cfg.text_pretrain_steps)))
    rng = random.Random(cfg.seed * 7 + 12)
    eos = tokenizer.eos_token_id
    n = tokenizer.model_max_length

    def batch(k: int, held_out: bool = False):
        prompts = [scene_prompt(sample_scene(rng, jitter=False), rng, held_out) for _ in range(k)]
        ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        return ids, _prompt_labels(prompts)

    def loss_acc(enc, ids, labels):
        states, rows = _summary_states(enc, ids, eos)
        logits = [F.linear(states, w, b) for w, b in heads]
        loss = sum(F.cross_entropy(lg, labels[rows, i]) for i, lg in enumerate(logits))
        acc = [(lg.argmax(1) == labels[rows, i]).float().mean().item() for i, lg in enumerate(logits)]
        return loss, acc

    text_encoder.train()
    bar = progress(range(cfg.text_pretrain_steps), desc="text",
                   **({"position": bar_position} if bar_position is not None else {}))
    for step in bar:
        loss, acc = loss_acc(text_encoder, *batch(128))
        _optimise(loss, opt, lr_sched, params)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", obj=f"{acc[0]:.2f}")
    probe = copy.deepcopy(text_encoder).eval()
    unseen_to_unknown(probe, tokenizer)
    with torch.no_grad():
        _, acc = loss_acc(probe, *batch(512, held_out=True))
    return {f"text/held_out_{name}": a for name, a in zip(("object", "colour", "background", "position"), acc)}


class _LatentPool:
    """``size`` training scenes rendered and encoded once (scaled latents); batches are drawn epoch by epoch in a
    seeded order, so each latent is seen ``steps * batch / size`` times, each time with a fresh prompt and noise."""

    def __init__(self, vae, size: int, seed: int, chunk: int = 256):
        data = _Scenes(seed)
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


def make_text_encoder(cfg: WorldConfig, tokenizer):
    """The text encoder stage 3 starts from, freshly initialised (draws from torch's global generator, seeded)."""
    torch.manual_seed(cfg.seed + 2)
    text_encoder = M.make_text_encoder(tokenizer)
    if not cfg.text_positions:
        without_positions(text_encoder)
    return text_encoder


def pretrain_text_one_thread(cfg: WorldConfig, tokenizer, text_encoder,
                             bar_position: int | None = None) -> dict[str, float]:
    """Stage 3a on one thread, wherever it runs (beside the VAE in a whole build, before the UNet when the VAE and
    judge are reused): the thread count changes float sums, and both paths must give the same encoder."""
    if not cfg.text_pretrain_steps:
        return {}
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # per OS thread
    try:
        return pretrain_text(cfg, tokenizer, text_encoder, bar_position)
    finally:
        torch.set_num_threads(prev)


def train_unet(cfg: WorldConfig, vae, tokenizer, text_encoder=None, text_metrics: dict | None = None):
    """Stage 3. ``text_encoder``: one stage 3a already trained (:func:`make_text_encoder` +
    :func:`pretrain_text_one_thread`); by default both run here."""
    if text_encoder is None:
        text_encoder = make_text_encoder(cfg, tokenizer)
        text_metrics = pretrain_text_one_thread(cfg, tokenizer, text_encoder)
    text_metrics = text_metrics or {}
    torch.manual_seed(cfg.seed + 3)
    unet = M.make_unet()
    sched = M.make_train_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, betas=(0.9, 0.99), weight_decay=0.01, fused=True)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.unet_steps, min(150, cfg.unet_steps)))
    pool = _LatentPool(vae, cfg.unet_pool, cfg.seed * 7 + 13) if cfg.unet_pool else None
    data = _Scenes(cfg.seed * 7 + 3)
    prng = random.Random(cfg.seed * 7 + 4)
    tokens = _Prompts(tokenizer, cfg, random.Random(cfg.seed * 7 + 6))
    g = torch.Generator().manual_seed(cfg.seed * 7 + 5)
    scale = vae.config.scaling_factor
    ema = _EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    unet.train()
    text_encoder.train()
    bar = progress(range(cfg.unet_steps), desc="unet")
    ema_loss = None
    for step in bar:
        if pool is not None:
            lat, scenes = pool.batch(cfg.unet_batch)
        else:
            x, scenes = data.batch(cfg.unet_batch)
            with torch.no_grad():
                lat = vae.encode(x).latent_dist.mean * scale
        prompts = ["" if prng.random() < cfg.cond_dropout else scene_prompt(s, prng) for s in scenes]
        ids = tokens(prompts)
        cond = text_encoder(ids)[0]
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(lat),), generator=g)
        noisy = sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        err = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:
            s = snr[t]
            err = err * torch.clamp(s, max=cfg.min_snr_gamma) / s
        loss = err.mean()
        if not torch.isfinite(loss):
            from ...errors import TrainingDiverged
            raise TrainingDiverged(f"world UNet loss became {loss.item()} at step {step}; lower --unet-lr")
        _optimise(loss, opt, lr_sched, params)
        if ema is not None:
            ema.update()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
    if ema is not None:
        ema.copy_to_params()
    n_unseen = unseen_to_unknown(text_encoder, tokenizer)
    logger.info("world build: %d token ids that training prompts never contain now read as the unknown token",
                n_unseen)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return text_encoder, unet, {"unet/final_loss": ema_loss, "text/unseen_as_unknown": n_unseen, **text_metrics}


# -- the whole build --------------------------------------------------------------------------------------------
def measure(pipeline_dir: str | os.PathLike, judge_dir: str | os.PathLike, cfg: WorldConfig) -> dict[str, float]:
    """The quality figures of a saved world (as loaded from disk: fp16 weights run in float32).

    judge/*: the judge on held-out renders; judge_vae_roundtrip/*: the same after a VAE round trip;
    model/*: the model at ``cfg``'s sampling defaults on held-out phrasings (see :func:`quality.model_quality`).
    """
    from ..judge import load_judge
    from ..quality import judge_accuracy, model_quality
    pipe = M.load_pipeline(pipeline_dir)
    judge = load_judge(judge_dir)
    n_eval = 300 if cfg.quick else 3000
    rt = lambda a: _to_uint8(vae_roundtrip(pipe.vae, _to_pixels(a)))  # noqa: E731
    jm = judge_accuracy(judge, n=n_eval, seed=cfg.seed + 10_000)
    jm_rt = judge_accuracy(judge, n=n_eval // 3, seed=cfg.seed + 20_000, roundtrip=rt)
    mm, _ = model_quality(pipe, judge, n_per_concept=cfg.eval_per_concept, n_benign=cfg.eval_benign,
                          seed=cfg.seed + 777, steps=cfg.sample_steps, guidance=cfg.guidance,
                          n_agreement=20 if cfg.quick else 100)
    out = {f"judge/{k}": v for k, v in jm.items()}
    out.update({f"judge_vae_roundtrip/{k}": v for k, v in jm_rt.items()})
    out.update({f"model/{k}": v for k, v in mm.items()})
    return out


def load_as_float32(pipeline_dir: str | os.PathLike) -> None:
    """Weights stay fp16 on disk, but a plain ``from_pretrained`` should give float32 models (CPU inference).

    diffusers casts to float32 by default; transformers 5 keeps the dtype the config records, so the text
    encoder's config is told float32 (otherwise it loads fp16 and feeds fp16 states to a float32 UNet).
    """
    cfg_path = Path(pipeline_dir) / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2 ** 20


def _load_vae_judge(world_dir: Path):
    """The VAE and judge of an existing world folder (``pipeline/`` + ``judge/``), with the VAE's build metrics."""
    from diffusers import AutoencoderKL

    from ...artifacts import read_manifest
    from ..judge import load_judge
    if not (world_dir / "pipeline" / "vae").is_dir() or not (world_dir / "judge").is_dir():
        raise SafealignError(f"--reuse-vae-judge {world_dir} is not a world folder (needs pipeline/vae and judge/); "
                             "pass the folder `safealign world build --output` wrote")
    man = read_manifest(world_dir / "pipeline")
    vae = AutoencoderKL.from_pretrained(world_dir / "pipeline" / "vae", torch_dtype=torch.float32).eval()
    vae.requires_grad_(False)
    return vae, load_judge(world_dir / "judge"), man


class _Cancelled(Exception):
    pass


def _vae_and_judge(cfg: WorldConfig, also: Callable[[int | None], None] | None = None):
    """Stages 1-2: the VAE, and the judge's first round (renders alone, one thread) alongside it on a worker thread
    when the VAE leaves a core free; then the judge's round with the VAE's round trip on every thread. ``also``
    (one thread, needs no VAE, must not draw from torch's global generator: stage 3a) runs on the worker after the
    judge's first round, or after it in turn when nothing runs alongside; it gets its progress bar's line.

    The judge's first round needs no VAE, and the one-thread VAE stage (381 s) leaves the second core idle: run
    there, the judge stage adds only its short second round to the build. Its numbers do not depend on whether it
    ran alongside: the round runs on one thread either way, from its own seeded streams.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..judge import JudgeTrainer
    timings: dict[str, float] = {}
    jdata = _Scenes(cfg.seed * 7 + 2)
    stop = threading.Event()

    def batch(_step: int):
        if stop.is_set():
            raise _Cancelled
        return jdata.batch(cfg.judge_batch)

    # made here, before the VAE: building the net draws from torch's global generator, which the VAE stage (on
    # another thread) also draws from; training the judge draws from its own generator only
    trainer = JudgeTrainer(batch, seed=cfg.seed + 1, progress_desc="judge")

    def first_round(bar_position: int | None = None) -> None:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)  # per OS thread: the caller's count is untouched
        try:
            t0 = time.perf_counter()
            trainer.train(cfg.judge_steps, cfg.judge_lr, bar_position=bar_position)
            timings["judge_renders_alongside_vae"] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(prev)
        if also is not None:
            t0 = time.perf_counter()
            also(bar_position)
            timings["text_pretrain"] = time.perf_counter() - t0

    vae_threads = cfg.vae_threads or cfg.threads
    alongside = vae_threads < cfg.threads
    logger.info("world build: stage 1/4 VAE (%d steps)%s", cfg.vae_steps,
                f", judge round 1 ({cfg.judge_steps} steps){' and stage 3a, text' if also else ''} alongside"
                if alongside else "")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="world-judge") as pool:
        pending = pool.submit(first_round, 1) if alongside else None
        try:
            torch.set_num_threads(vae_threads)
            try:
                vae, metrics = train_vae(cfg)
            finally:
                torch.set_num_threads(cfg.threads)
            timings["vae"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if pending is not None:
                pending.result()
            else:
                first_round()
        except BaseException:
            stop.set()
            raise
    timings["judge"] = time.perf_counter() - t0
    if cfg.vae_decoder_steps:
        # stage 1b on every thread, once the judge's first round has freed the second core
        logger.info("world build: stage 1b/4 VAE decoder (%d steps, object pixels weighted)", cfg.vae_decoder_steps)
        t1 = time.perf_counter()
        refine_decoder(vae, cfg)
        metrics.update(reconstruction(vae, _Scenes(cfg.seed * 7 + 9).batch(64 if cfg.quick else 512)[0]))
        timings["vae_decoder"] = time.perf_counter() - t1
    vae = as_shipped(vae)
    t0 = time.perf_counter()
    logger.info("world build: stage 2/4 judge with the VAE's round trip (%d steps)", cfg.judge_roundtrip_steps)
    trainer.train(cfg.judge_roundtrip_steps, cfg.judge_lr * 0.5, roundtrip=lambda x: vae_roundtrip(vae, x),
                  roundtrip_frac=0.5)
    timings["judge"] += time.perf_counter() - t0
    return vae, trainer.judge(), metrics, timings


def build(out_dir: str | os.PathLike | None = None, quick: bool = False, seed: int = 0, threads: int = 2,
          config: WorldConfig | None = None, reuse_vae_judge: str | os.PathLike | None = None) -> dict:
    """Train the world from scratch and write ``out_dir/{pipeline,judge}`` atomically; returns the manifest.

    Default ``out_dir``: the weights folder shipped in the package (overwritten). ``reuse_vae_judge``: take the VAE
    and judge of that world folder (stages 1-2 skipped; the manifest records where they came from and how they
    were built) and retrain only the text encoder + UNet -- for iterating on stage 3.
    """
    from ...artifacts import atomic_dir, write_manifest
    from .. import WEIGHTS

    cfg = config or (WorldConfig.quick_config(seed) if quick else WorldConfig(seed=seed))
    if config is None and threads != cfg.threads:
        cfg = dataclasses.replace(cfg, threads=threads)
    out = Path(out_dir) if out_dir is not None else WEIGHTS
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    metrics: dict[str, float] = {}
    t_all = time.perf_counter()
    try:
        with atomic_dir(out, overwrite=True) as tmp:
            reused = None
            tokenizer = M.make_tokenizer()
            text_encoder, text_metrics = None, None
            if reuse_vae_judge is not None:
                vae, judge, src = _load_vae_judge(Path(reuse_vae_judge))
                metrics.update({k: v for k, v in src.get("metrics", {}).items() if k.startswith("vae/")})
                # a folder that itself reused its VAE and judge passes on who really made them
                maker = src.get("vae_judge_reused") or src
                reused = {"from": str(reuse_vae_judge), "command": maker.get("command"),
                          "config": maker.get("config"), "timings_s": maker.get("timings_s")}
                logger.info("world build: VAE and judge reused from %s", reuse_vae_judge)
            else:
                # stage 3a needs no VAE: made here (its init draws from torch's global generator, which the VAE
                # stage on the main thread draws from too) and trained beside the VAE, after the judge's round
                text_encoder, text_metrics = make_text_encoder(cfg, tokenizer), {}

                def stage_3a(bar_position: int | None) -> None:
                    text_metrics.update(pretrain_text_one_thread(cfg, tokenizer, text_encoder, bar_position))
                vae, judge, mv, tv = _vae_and_judge(cfg, also=stage_3a if cfg.text_pretrain_steps else None)
                metrics.update(mv)
                timings.update(tv)

            t0 = time.perf_counter()
            logger.info("world build: stage 3/4 text encoder + UNet (%d steps)", cfg.unet_steps)
            text_encoder, unet, mu = train_unet(cfg, vae, tokenizer, text_encoder, text_metrics)
            metrics.update(mu)
            timings["unet"] = time.perf_counter() - t0

            # save first (fp16 weights, a standard pipeline folder), then measure what ships
            pipe = M.assemble_pipeline(vae, text_encoder, tokenizer, unet)
            pipe.to(torch.float16)
            pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
            load_as_float32(tmp / "pipeline")
            judge.save(tmp / "judge")

            t0 = time.perf_counter()
            logger.info("world build: stage 4/4 quality")
            metrics.update(measure(tmp / "pipeline", tmp / "judge", cfg))
            timings["quality"] = time.perf_counter() - t0
            timings["total"] = time.perf_counter() - t_all
            counts = {"unet_params": sum(p.numel() for p in unet.parameters()),
                      "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
                      "vae_params": sum(p.numel() for p in vae.parameters()),
                      "judge_params": sum(p.numel() for p in judge.net.parameters())}
            default = WorldConfig.quick_config(cfg.seed) if cfg.quick else WorldConfig(seed=cfg.seed)
            common = dict(config=to_dict(cfg), timings_s={k: round(v, 1) for k, v in timings.items()},
                          command=("safealign world build" + (" --quick" if cfg.quick else "")
                                   + (f" --seed {cfg.seed}" if cfg.seed else "")
                                   + (f" --threads {cfg.threads}" if cfg.threads != 2 else "")
                                   + (f" --unet-steps {cfg.unet_steps}" if cfg.unet_steps != default.unet_steps
                                      else "")
                                   + (" --reuse-vae-judge DIR" if reused else "")),
                          parameters=counts, threads=cfg.threads)
            if reused:
                common["vae_judge_reused"] = reused
            write_manifest(tmp / "judge", "judge", metrics={k: v for k, v in metrics.items()
                                                            if k.startswith("judge")}, **common)
            size = _size_mb(tmp)
            metrics["package_size_mb"] = round(size, 2)
            manifest = write_manifest(tmp / "pipeline", "world", metrics=metrics,
                                      sampling={"scheduler": "DPMSolverMultistepScheduler", "steps": cfg.sample_steps,
                                                "guidance": cfg.guidance, "resolution": M.IMAGE_SIZE},
                                      **common)
            (tmp / "pipeline" / "README.md").write_text(_model_card(manifest))
    finally:
        torch.set_num_threads(prev_threads)
    logger.info("world build: done in %.0f s -> %s", time.perf_counter() - t_all, out)
    return manifest


def _model_card(manifest: dict) -> str:
    m = manifest["metrics"]
    lines = ["# safealign mini world", "",
             "A 32x32 text-to-image model of procedurally rendered scenes, trained from scratch by "
             f"`{manifest['command']}`. Not a real image model: the test bed of safealign.", "",
             "| metric | value |", "|---|---|"]
    for k in ("model/unsafe/hazard_rate", "model/safe/hazard_rate", "model/benign/hazard_rate",
              "model/accuracy/colour", "model/accuracy/background", "model/accuracy/object"):
        if k in m:
            lines.append(f"| {k} | {m[k]:.3f} |")
    return "\n".join(lines) + "\n" + "\n```json\n" + json.dumps(manifest["sampling"], indent=2) + "\n```\n"
