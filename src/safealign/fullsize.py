"""Full-size Stable Diffusion architectures with random weights, built in code (nothing downloaded).

``full_size_pipeline(kind, folder)`` writes a diffusers pipeline folder (safetensors) with the published
configurations of SD 1.5, SD 2.1 (v-prediction, 768 px) and SDXL base 1.0: the same UNet blocks, channels, heads,
cross-attention widths, transformer depths and text encoders (CLIP ViT-L/14, OpenCLIP ViT-H/14 with its last layer
dropped as diffusers ships it, OpenCLIP ViT-bigG/14), so memory, dtypes, gradient checkpointing, SDXL's added
conditioning and v-prediction run on the real shapes. The tokenizer is a small CLIP tokenizer built in memory (the
published vocabulary is a download); the text encoders keep the published 49,408-row embedding.

``sample_size`` (latent pixels) only sets the pipeline's default image size (``8 * sample_size`` pixels); no
weight depends on it, so the slow tests run these architectures end to end at 64 px.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from .testing import TINY_WORDS, make_clip_tokenizer

Kind = Literal["sd15", "sd21v", "sdxl"]
KINDS: tuple[str, ...] = ("sd15", "sd21v", "sdxl")
#: the published default latent size of each kind (images are 8x that)
NATIVE_SAMPLE_SIZE = {"sd15": 64, "sd21v": 96, "sdxl": 128}
_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1)


def _unet_config(kind: Kind, sample_size: int) -> dict:
    """The UNet2DConditionModel configuration of the published checkpoint."""
    common = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                  act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_eps=1e-5)
    if kind in ("sd15", "sd21v"):
        cross = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
        cfg = dict(block_out_channels=(320, 640, 1280, 1280), down_block_types=cross, up_block_types=up)
        if kind == "sd15":
            return {**common, **cfg, "cross_attention_dim": 768, "attention_head_dim": 8}
        return {**common, **cfg, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                "use_linear_projection": True, "upcast_attention": True}
    return {**common, "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
            "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}


def _vae(kind: Kind, sample_size: int):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=4, norm_num_groups=32, act_fn="silu",
                         sample_size=8 * sample_size, scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
                         force_upcast=kind == "sdxl").eval()


#: (hidden, intermediate, layers, heads, activation, projection) of the published text encoders
_TEXT = {"clip-l": (768, 3072, 12, 12, "quick_gelu", 768),      # CLIP ViT-L/14 (SD 1.5; SDXL's first)
         "openclip-h": (1024, 4096, 23, 16, "gelu", 512),       # OpenCLIP ViT-H/14, last layer dropped (SD 2.1)
         "openclip-g": (1280, 5120, 32, 20, "gelu", 1280)}      # OpenCLIP ViT-bigG/14 (SDXL's second)


def _text_encoder(name: str, tokenizer, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    hidden, inter, layers, heads, act, proj = _TEXT[name]
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=proj,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def build_full_size(kind: Kind, sample_size: int | None = None, seed: int = 0):
    """The pipeline of ``kind`` in memory, random weights seeded by ``seed`` (fp32)."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    size = sample_size or NATIVE_SAMPLE_SIZE[kind]
    torch.manual_seed(seed)
    tok = make_clip_tokenizer(TINY_WORDS, model_max_length=77)
    vae = _vae(kind, size)
    unet = UNet2DConditionModel(**_unet_config(kind, size)).eval()
    if kind == "sdxl":
        tok2 = make_clip_tokenizer(TINY_WORDS, model_max_length=77)
        te1, te2 = _text_encoder("clip-l", tok), _text_encoder("openclip-g", tok2, projection=True)
        sched = EulerDiscreteScheduler(**_BETAS, timestep_spacing="leading")
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=sched)
    if kind == "sd15":
        te = _text_encoder("clip-l", tok)
        sched = PNDMScheduler(**_BETAS, skip_prk_steps=True, set_alpha_to_one=False)
    else:
        te = _text_encoder("openclip-h", tok)
        sched = DDIMScheduler(**_BETAS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def full_size_pipeline(kind: Kind, folder: str | os.PathLike, sample_size: int | None = None, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write the random-weight pipeline of ``kind`` to ``folder`` (safetensors, ``dtype``) and return the folder.

    Memory: SD 1.5 ~1.1 G parameters, SD 2.1 ~1.3 G, SDXL ~3.5 G (a 10 GB UNet in fp32)."""
    pipe = build_full_size(kind, sample_size, seed)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
