"""Tiny seeded pipelines built in code (SD1-, SD2- and SDXL-shaped) for tests, benchmarks and the first demo.

They have the exact structure of the real families (same diffusers/transformers classes, same conditioning) at a
few hundred kilobytes, so every code path that runs on SD1.5/SDXL runs here on a CPU in milliseconds.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Literal

import torch

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def make_clip_tokenizer(words: Iterable[str], model_max_length: int = 16):
    """A CLIPTokenizer in which every word of ``words`` is exactly one token (other words fall back to letters).

    transformers 5 builds it from memory as ``CLIPTokenizer(vocab=dict, merges=list_of_tuples, ...)``
    (``vocab_file=`` is silently ignored). BPE merges greedily by rank, so one merge path per word is not enough:
    a pair from another word (the "ac" of "activity" inside "background") can fire first and strand the word in
    pieces. Here every contiguous piece of a word is a token and every split of a piece into two pieces is a merge,
    so whatever order the merges fire in, a known word always ends as one token.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for c in string.ascii_lowercase + string.digits + "-',.":
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    allowed = set(string.ascii_lowercase + string.digits + "-")
    for w in sorted({w.lower() for w in words}):
        if not w or not set(w) <= allowed:
            continue
        sym = list(w[:-1]) + [w[-1] + "</w>"]  # CLIP marks the end of a word on its last symbol
        n = len(sym)
        for length in range(2, n + 1):  # shorter pieces first: their merges rank before longer ones
            for i in range(n - length + 1):
                for k in range(i + 1, i + length):
                    pair = ("".join(sym[i:k]), "".join(sym[k:i + length]))
                    if pair not in seen:
                        seen.add(pair)
                        merges.append(pair)
                add("".join(sym[i:i + length]))
    for s_ in SPECIAL:
        add(s_)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         bos_token=SPECIAL[0], eos_token=SPECIAL[1], pad_token=SPECIAL[1], unk_token=SPECIAL[1])


TINY_WORDS = ("a photo of the red green blue yellow knife flower skull apple on in with and cat dog house tree "
              "gun cup painting drawing").split()


def _text_encoder(tokenizer, hidden: int, seed: int, projection: bool = False, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         projection_dim=hidden, hidden_act=act, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def build_tiny_pipeline(family: Literal["sd1", "sd2", "sdxl"] = "sd1", seed: int = 0, sample_size: int = 8,
                        words: Iterable[str] = TINY_WORDS):
    """A randomly initialised, seeded pipeline of the given family (latents ``sample_size``^2, images 2x that)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    tok = make_clip_tokenizer(words)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2).eval()
    sched_kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1)
    if family in ("sd1", "sd2"):
        hidden = 32 if family == "sd1" else 48
        te = _text_encoder(tok, hidden, seed + 1, act="quick_gelu" if family == "sd1" else "gelu")
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=hidden,
            attention_head_dim=4 if family == "sd1" else (4, 8), norm_num_groups=8,
            use_linear_projection=(family == "sd2")).eval()
        pred = "epsilon" if family == "sd1" else "v_prediction"
        sched = DDPMScheduler(prediction_type=pred, clip_sample=False, **sched_kw)
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        te1 = _text_encoder(tok, 16, seed + 1)
        tok2 = make_clip_tokenizer(words)
        te2 = _text_encoder(tok2, 16, seed + 3, projection=True)
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,
            transformer_layers_per_block=(1, 1)).eval()
        sched = EulerDiscreteScheduler(**sched_kw)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=sched)
    raise ValueError(f"unknown family {family!r}")


def sd15_unet_config() -> dict:
    """The UNet2DConditionModel config of Stable Diffusion 1.5 (for random-weight benchmarks; no download)."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


TOY_CONCEPTS = {  # category -> (unsafe concept, safe twin, unsafe colour, safe colour)
    "violence": ("knife", "flower", (220, 30, 30), (30, 200, 60)),
    "shocking": ("skull", "apple", (240, 240, 240), (240, 200, 40)),
}


def _toy_image(concept: str, colour: tuple[int, int, int], size: int, rng):
    from PIL import Image, ImageDraw
    bg = tuple(int(c) for c in rng.integers(0, 60, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    m = size // 8
    if concept in ("knife", "skull"):  # hazards: an X across the frame
        d.line([(m, m), (size - m, size - m)], fill=colour, width=max(2, size // 6))
        d.line([(m, size - m), (size - m, m)], fill=colour, width=max(2, size // 6))
    else:  # safe twins: a filled disc of the same extent
        d.ellipse([m, m, size - m, size - m], fill=colour)
    return im


def make_toy_dataset(folder, pairs_per_category: int = 16, size: int = 16, seed: int = 0,
                     test_fraction: float = 0.25):
    """A small paired dataset (unsafe: a cross; safe twin: a disc) in the format of DESIGN.md."""
    import numpy as np

    from .data.dataset import write_dataset

    rng = np.random.default_rng(seed)
    rows, images = [], {}
    templates = ("a {} on a dark background", "a drawing of a {}", "a photo of a {}")
    for cat, (bad, good, col_bad, col_good) in TOY_CONCEPTS.items():
        for i in range(pairs_per_category):
            pid = f"{cat}-{i:04d}"
            t = templates[i % len(templates)]
            st = int(rng.integers(0, 2**31))
            u, s = f"images/{pid}_u.png", f"images/{pid}_s.png"
            images[u] = _toy_image(bad, col_bad, size, np.random.default_rng(st))
            images[s] = _toy_image(good, col_good, size, np.random.default_rng(st))
            split = "test" if i >= pairs_per_category * (1 - test_fraction) else "train"
            rows.append(dict(pair_id=pid, category=cat, concept=bad, unsafe_prompt=t.format(bad),
                             safe_prompt=t.format(good), seed=st, unsafe_image=u, safe_image=s, split=split))
    return write_dataset(folder, rows, images, generator={"source": "safealign.testing.make_toy_dataset"},
                         config={"pairs_per_category": pairs_per_category, "size": size, "seed": seed})
