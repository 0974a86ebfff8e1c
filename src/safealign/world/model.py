"""The world model's architecture (Stable Diffusion's classes at miniature size), loading and sampling.

32x32 RGB images, an AutoencoderKL to 8x8x4 latents, a CLIPTextModel over the world's own vocabulary and a
UNet2DConditionModel of ~7M parameters. Training uses DDPM (epsilon prediction, SD's scaled-linear betas); the
shipped pipeline samples with DPM-Solver++ (2M) at the defaults recorded in its ``safealign.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import SafealignError
from .scene import vocabulary

IMAGE_SIZE = 32
MAX_TOKENS = 24
TEXT_HIDDEN = 128
SCHEDULER_KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", steps_offset=1)
#: sampling defaults (overridden by what a built pipeline records in its safealign.json)
DEFAULT_STEPS = 12
DEFAULT_GUIDANCE = 3.0


def make_tokenizer(words: Sequence[str] | None = None):
    """A CLIPTokenizer in which every world word is one token (:func:`safealign.testing.make_clip_tokenizer`)."""
    from ..testing import make_clip_tokenizer
    return make_clip_tokenizer(words if words is not None else vocabulary(), MAX_TOKENS)


def make_text_encoder(tokenizer, hidden: int = TEXT_HIDDEN, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                         projection_dim=hidden, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg)


def make_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                         latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE)


def make_unet(cross_attention_dim: int = TEXT_HIDDEN, channels: Sequence[int] = (64, 128, 160),
              pooled_text: bool = True):
    """The world's UNet. ``pooled_text``: the prompt, attention-pooled, is also added to the timestep embedding
    (diffusers' ``addition_embed_type="text"``), so every ResNet block -- the 2x2 ones without cross-attention too --
    knows what to draw; the standard pipeline feeds it from the same encoder states."""
    from diffusers import UNet2DConditionModel
    extra = dict(addition_embed_type="text", addition_embed_type_num_heads=4) if pooled_text else {}
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=32, **extra)


def make_train_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(clip_sample=False, **SCHEDULER_KW)


def make_sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **SCHEDULER_KW)


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """A StableDiffusionPipeline from the world's components (no safety checker: the world's judge does that)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_sample_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load the world pipeline (the shipped one by default) in ``dtype`` (float32 on CPU)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from .paths import pipeline_path, verify_checksums
    p = Path(path) if path is not None else pipeline_path()
    if not (p / "model_index.json").is_file():
        raise SafealignError(f"{p} is not a world pipeline folder (no model_index.json); run `safealign world "
                             "build` or pass the pipeline/ folder it wrote")
    if path is not None:
        verify_checksums(p.parent, p.name)  # a world folder's own checksums.json, when it has one
    import transformers

    from ..backbone import _read_model_index, check_finite, pipeline_modules, require_safetensors
    require_safetensors(p, _read_model_index(str(p), True), str(p))
    prev = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(logging.ERROR)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(p, dtype=dtype, local_files_only=True, use_safetensors=True)
    finally:
        diffusers.utils.logging.set_verbosity(prev)
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    check_finite(pipeline_modules(pipe), str(p))
    return pipe


def sampling_defaults(path: str | os.PathLike | None = None) -> dict:
    """Default ``steps`` and ``guidance`` recorded with a built pipeline (module defaults when absent)."""
    from ..artifacts import read_manifest
    from .paths import pipeline_path
    try:
        m = read_manifest(Path(path) if path is not None else pipeline_path(), required=False) or {}
    except SafealignError:
        m = {}
    s = m.get("sampling", {})
    return {"steps": int(s.get("steps", DEFAULT_STEPS)), "guidance": float(s.get("guidance", DEFAULT_GUIDANCE))}


def generate(pipe, prompts: Sequence[str], *, seed: int = 0, steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch_size: int = 64) -> np.ndarray:
    """Images for ``prompts`` as (N, 32, 32, 3) uint8; image i uses generator seed ``seed + i`` (batch-invariant,
    :func:`safealign.sampling.generate`)."""
    from ..sampling import SamplingOptions
    from ..sampling import generate as sample
    if not len(prompts):
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return sample(pipe, prompts, range(seed, seed + len(prompts)), SamplingOptions(steps, guidance),
                  batch_size=batch_size)
