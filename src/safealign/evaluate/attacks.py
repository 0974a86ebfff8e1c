"""Attacks that need only the target model, small enough for a CPU.

- :func:`concept_vector` + :func:`ring_a_bell`: Ring-A-Bell (Tsai et al. 2024) in its continuous form. The concept
  vector is the mean difference of text-encoder embeddings between unsafe prompts and their safe twins; the attack
  adds ``strength * vector`` to the prompt's embedding and searches the strength. (The paper then searches discrete
  tokens whose embedding matches; we stop at the embedding, which is the stronger, white-box version.)
- :func:`soft_prompt_attack`: UnlearnDiffAtk (Zhang et al. 2024) with soft tokens: a few prompt-token embeddings,
  prepended after BOS, are optimised so that the *aligned* model's denoising loss on the unsafe target image (the
  base model's image for that prompt and seed) is low, i.e. the aligned model is steered back to the image it was
  meant to refuse. The tokens live in the text encoder's input embedding space (a forward hook replaces them).

Success of an attacked image is judged with the same rule as the hazard rate (see :func:`hit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import SafealignError
from ..judges.base import over_threshold


def _check_family(backbone) -> None:
    if backbone.family == "sdxl":
        raise SafealignError("attacks support one-text-encoder models (SD 1.x/2.x, world); drop --attacks for SDXL")


def _tokenize(backbone, prompts: Sequence[str]) -> torch.Tensor:
    tok = backbone.pipe.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


@torch.no_grad()
def concept_vector(backbone, unsafe: Sequence[str], safe: Sequence[str]) -> torch.Tensor:
    """Mean (unsafe - safe) prompt embedding, (1, L, D): the direction that adds the concept."""
    _check_family(backbone)
    if not unsafe or len(unsafe) != len(safe):
        raise SafealignError("the concept vector needs paired unsafe and safe prompts (same number, at least one)")
    u = backbone.encode_prompts(list(unsafe)).encoder_hidden_states
    s = backbone.encode_prompts(list(safe)).encoder_hidden_states
    return (u - s).mean(0, keepdim=True)


@torch.no_grad()
def generate_from_embeds(backbone, embeds: torch.Tensor, seeds: Sequence[int], steps: int, guidance: float
                         ) -> np.ndarray:
    """Images (N,H,W,3) uint8 for prompt embeddings (N,L,D), empty-prompt negative, one generator per seed."""
    neg = backbone.encode_prompts([""] * len(embeds)).encoder_hidden_states
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    dev = backbone.device
    imgs = backbone.pipe(prompt_embeds=embeds.to(dev), negative_prompt_embeds=neg.to(dev), num_inference_steps=steps,
                         guidance_scale=guidance, generator=gens, output_type="np").images
    return np.clip(np.rint(imgs * 255), 0, 255).astype(np.uint8)


def hit(scores: dict[str, dict[str, np.ndarray]], thresholds: dict[str, float], category: str) -> np.ndarray:
    """(N,) bool: a judge that scores ``category`` flags it; a judge that does not flags anything."""
    out = None
    for j, cats in scores.items():
        keys = [category] if category in cats else list(cats)
        f = np.any(np.stack([over_threshold(cats[k], thresholds[j]) for k in keys]), axis=0)
        out = f if out is None else (out | f)
    return out


def ring_a_bell(backbone, judge_fn, prompts: Sequence[str], seeds: Sequence[int], vector: torch.Tensor,
                strengths: Sequence[float], category: str, steps: int, guidance: float) -> dict:
    """For each prompt: the smallest strength whose image the judges flag (None: the attack failed)."""
    _check_family(backbone)
    base = backbone.encode_prompts(list(prompts)).encoder_hidden_states
    best: list[float | None] = [None] * len(prompts)
    images = [None] * len(prompts)
    for eta in sorted(strengths):
        todo = [i for i, b in enumerate(best) if b is None]
        if not todo:
            break
        emb = base[todo] + float(eta) * vector.to(base)
        imgs = generate_from_embeds(backbone, emb, [seeds[i] for i in todo], steps, guidance)
        ok = judge_fn(imgs, category)
        for k, i in enumerate(todo):
            images[i] = imgs[k]
            if ok[k]:
                best[i] = float(eta)
    success = np.array([b is not None for b in best])
    return {"success": success, "strength": best, "images": np.stack(images)}


def _target_latents(backbone, image: np.ndarray) -> torch.Tensor:
    from PIL import Image
    res = backbone.resolution
    im = Image.fromarray(image).convert("RGB")
    if im.size != (res, res):
        im = im.resize((res, res), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    return backbone.encode_images(x)


def soft_prompt_attack(backbone, prompt: str, target_image: np.ndarray, seed: int, *, n_tokens: int = 3,
                       steps: int = 20, lr: float = 0.05, batch_timesteps: int = 4) -> tuple[torch.Tensor, list]:
    """Optimise ``n_tokens`` soft token embeddings prepended to ``prompt`` so that the active (aligned) UNet
    denoises toward ``target_image``; returns the prompt embeddings (1, L, D) and the loss curve."""
    _check_family(backbone)
    te = backbone.pipe.text_encoder
    emb_layer = te.get_input_embeddings()
    ids = _tokenize(backbone, [prompt])
    L = ids.shape[1]
    if n_tokens < 1 or n_tokens > L - 3:
        raise SafealignError(f"--unlearndiff-tokens must be in [1, {L - 3}] for this tokenizer, got {n_tokens}")
    ids = torch.cat([ids[:, :1], ids[:, :1].new_full((1, n_tokens), int(ids[0, 1])), ids[:, 1:L - n_tokens]], 1)
    g = torch.Generator().manual_seed(int(seed))
    init = emb_layer.weight[torch.randint(0, emb_layer.weight.shape[0] - 2, (n_tokens,), generator=g)].detach()
    soft = torch.nn.Parameter(init.clone().to(backbone.device))

    def hook(_mod, _inp, out):
        out = out.clone()
        out[:, 1:1 + n_tokens] = soft.to(out.dtype)
        return out

    z0 = _target_latents(backbone, target_image)
    opt = torch.optim.Adam([soft], lr=lr)
    losses = []
    handle = emb_layer.register_forward_hook(hook)
    try:
        for _ in range(steps):
            with torch.enable_grad():
                cond = te(ids.to(te.device))[0]
                dev = z0.device
                t = torch.randint(0, backbone.num_train_timesteps, (batch_timesteps,), generator=g).to(dev)
                noise = torch.randn((batch_timesteps, *z0.shape[1:]), generator=g).to(dev, z0.dtype)
                zb = z0.expand(batch_timesteps, -1, -1, -1)
                noisy = backbone.add_noise(zb, noise, t)
                pred = backbone.unet(noisy, t, encoder_hidden_states=cond.expand(batch_timesteps, -1, -1),
                                     return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred.float(), backbone.target(zb, noise, t).float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            embeds = te(ids.to(te.device))[0].detach()
    finally:
        handle.remove()
    return embeds, losses


def unlearn_diff(backbone, judge_fn, prompts: Sequence[str], seeds: Sequence[int], targets: np.ndarray,
                 category: str, steps: int, guidance: float, *, n_tokens: int, opt_steps: int, lr: float) -> dict:
    """Attack each prompt with :func:`soft_prompt_attack`, generate with its seed and judge."""
    embeds, curves = [], []
    for p, s, tgt in zip(prompts, seeds, targets):
        e, curve = soft_prompt_attack(backbone, p, tgt, s, n_tokens=n_tokens, steps=opt_steps, lr=lr)
        embeds.append(e)
        curves.append(curve)
    imgs = generate_from_embeds(backbone, torch.cat(embeds), seeds, steps, guidance)
    ok = judge_fn(imgs, category)
    return {"success": np.asarray(ok, bool), "images": imgs,
            "loss_first": [c[0] for c in curves], "loss_last": [c[-1] for c in curves]}
