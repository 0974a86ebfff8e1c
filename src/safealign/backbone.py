"""Load a diffusers text-to-image pipeline and speak its family's dialect.

Families: ``sd1`` / ``sd2`` (one CLIP text encoder; sd2 usually v-prediction), ``sdxl`` (two text encoders, pooled
embeddings and added time ids) and ``world`` (the embedded mini world, an sd1-style pipeline shipped in the package).
Everything the trainers need from a model goes through :class:`Backbone`: prompt encoding, VAE encoding, the noise
target for the scheduler's prediction type, and one UNet call.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .errors import SafealignError

if TYPE_CHECKING:
    from .sampling import SamplingOptions

Family = Literal["sd1", "sd2", "sdxl"]
#: the sampler defaults of a pipeline that records none (diffusers' SD convention for guidance)
DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.5
PIPELINE_CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}


def resolve_model(model: str | os.PathLike) -> tuple[str, bool]:
    """Return (path or hub id, is_local). A plugin's name (``world``) is the pipeline the plugin ships."""
    from .plugins import get_plugin, is_plugin_name
    model = str(model)
    if is_plugin_name(model):
        return str(get_plugin(model).pipeline_path()), True
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise SafealignError(f"{p} is not a diffusers pipeline folder (no model_index.json); pass the folder "
                                 "written by pipe.save_pretrained, a cached hub id, or 'world'")
        return str(p), True
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model, False
    raise SafealignError(f"model {model!r} does not exist; pass a local diffusers pipeline folder, a hub id already "
                         "in your cache, or 'world'")


def _index_file(path: str, local: bool) -> Path:
    """The model_index.json of a local folder or of a cached hub snapshot."""
    if local:
        return Path(path) / "model_index.json"
    from huggingface_hub import try_to_load_from_cache  # reads the local cache only; never downloads
    try:
        f = try_to_load_from_cache(path, "model_index.json")
    except Exception:  # noqa: BLE001 - a malformed id is "not cached" too
        f = None
    if not isinstance(f, str):
        raise SafealignError(f"{path} is not in the local Hugging Face cache and safealign never downloads; "
                             f"fetch it first (huggingface-cli download {path}) or pass a local folder")
    return Path(f)


def _read_model_index(path: str, local: bool) -> dict:
    f = _index_file(path, local)
    try:
        index = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise SafealignError(f"{f} is not readable JSON ({str(e).splitlines()[0]}); the pipeline folder is "
                             "damaged") from None
    if not isinstance(index, dict):
        raise SafealignError(f"{f} must hold a JSON object; the pipeline folder is damaged")
    return index


#: weight files read by an unpickler, which can run code: never loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_safetensors(folder: Path, index: dict, model: str) -> None:
    """Every component folder of the pipeline that holds weights holds them as safetensors; a pickled-only one is
    a one-line error saying how to convert (checked before any loader runs)."""
    for name, spec in index.items():
        sub = folder / name
        if name.startswith("_") or not isinstance(spec, list) or not sub.is_dir():
            continue
        files = [f.name for f in sub.iterdir() if f.is_file()]
        pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickled and not any(".safetensors" in f for f in files):
            raise SafealignError(
                f"{model}: {name}/{pickled[0]} is a pickled weight file and safealign loads safetensors only "
                "(unpickling can run code); if you trust it, convert once in Python: "
                "pipe = DiffusionPipeline.from_pretrained(PATH); pipe.save_pretrained(PATH, safe_serialization=True)")


def check_finite(modules: dict[str, torch.nn.Module], source: str) -> None:
    """Every parameter and buffer of every module is finite (a NaN or a flipped exponent bit in a weight file
    otherwise gives black or noise images with exit 0)."""
    for what, mod in modules.items():
        for name, t in (*mod.named_parameters(), *mod.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise SafealignError(f"{source}: the {what}'s weight {name} contains NaN or Inf; the weight file is "
                                     "damaged -- restore or re-download it")


def detect_family(index: dict, unet_config: dict) -> Family:
    """sdxl: two text encoders / text_time embedding; sd2: 1024-d cross attention or linear projection; else sd1."""
    if "text_encoder_2" in index or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


@dataclass
class Conditioning:
    """Text conditioning for one batch of prompts (what the UNet's forward needs)."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        extra = {k: mv(v) for k, v in self.added_cond_kwargs.items()} if self.added_cond_kwargs else None
        return Conditioning(mv(self.encoder_hidden_states), extra)

    def repeat(self, n: int) -> Conditioning:
        """Concatenate the batch ``n`` times (e.g. winner + loser in one forward)."""
        extra = ({k: torch.cat([v] * n) for k, v in self.added_cond_kwargs.items()}
                 if self.added_cond_kwargs else None)
        return Conditioning(torch.cat([self.encoder_hidden_states] * n), extra)

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {"encoder_hidden_states": self.encoder_hidden_states}
        for k, v in (self.added_cond_kwargs or {}).items():
            d[f"added.{k}"] = v
        return d

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor]) -> Conditioning:
        extra = {k[len("added."):]: v for k, v in d.items() if k.startswith("added.")}
        return cls(d["encoder_hidden_states"], extra or None)

    @staticmethod
    def stack(items: list[Conditioning]) -> Conditioning:
        ehs = torch.cat([c.encoder_hidden_states for c in items])
        extra = None
        if items[0].added_cond_kwargs:
            extra = {k: torch.cat([c.added_cond_kwargs[k] for c in items]) for k in items[0].added_cond_kwargs}
        return Conditioning(ehs, extra)


class Backbone:
    """A loaded pipeline plus the family-specific encoding the trainers use."""

    def __init__(self, pipe, family: Family, source: str, path: str | None = None):
        from .plugins import plugin_for_folder, plugin_for_model
        self.pipe = pipe
        self.family = family
        self.source = source
        #: the local folder the pipeline was read from (None for a pipeline built in memory)
        self.path = path
        #: the model plugin that shipped or marked this pipeline (``world``), None for a plain diffusers model
        self.plugin = plugin_for_model(source) or (plugin_for_folder(path) if path else None)
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.prediction_type: str = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise SafealignError(f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                                 "use an epsilon or v_prediction model")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(self.unet.config.sample_size) * self.vae_scale_factor
        from diffusers import DDPMScheduler
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)

    def sampling_defaults(self) -> SamplingOptions:
        """The sampler settings this model is meant to be sampled with: its plugin's record, else SD's convention."""
        from .sampling import SamplingOptions
        if self.plugin is not None and self.path:
            steps, guidance = self.plugin.sampling_defaults(self.path)
            return SamplingOptions(steps, guidance)
        return SamplingOptions(DEFAULT_STEPS, DEFAULT_GUIDANCE)

    # -- identity ---------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What identifies the base model in artifacts (family, plugin, source, a fingerprint of UNet weights)."""
        return {"source": self.source, "family": self.family, "plugin": self.plugin.name if self.plugin else None,
                "fingerprint": self.fingerprint(), "prediction_type": self.prediction_type,
                "resolution": self.resolution}

    def fingerprint(self) -> str:
        """Cheap, stable hash of the UNet config and a sample of its weights (for cache keys and checks)."""
        import hashlib
        h = hashlib.sha256(json.dumps(dict(self.unet.config), sort_keys=True, default=str).encode())
        # base weights only, under their base names: attached LoRA adapters must not change the fingerprint
        base = sorted((n.replace(".base_layer", ""), p) for n, p in self.unet.named_parameters() if "lora_" not in n)
        for name, p in base[:: max(1, len(base) // 16)]:
            h.update(name.encode())
            h.update(p.detach().float().flatten()[:256].cpu().numpy().tobytes())
        for enc in self.text_encoders():
            h.update(json.dumps(enc.config.to_dict(), sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def text_encoders(self) -> list:
        encs = [self.pipe.text_encoder]
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            encs.append(self.pipe.text_encoder_2)
        return encs

    # -- encoding ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    def _tokenize(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning as the family's pipeline computes it (no classifier-free guidance)."""
        dev = self.pipe.text_encoder.device
        if self.family != "sdxl":
            ids = self._tokenize(self.pipe.tokenizer, prompts).to(dev)
            return Conditioning(self.pipe.text_encoder(ids)[0])
        hidden, pooled = [], None
        for tok, enc in ((self.pipe.tokenizer, self.pipe.text_encoder),
                         (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
            ids = self._tokenize(tok, prompts).to(enc.device)
            out = enc(ids, output_hidden_states=True)
            pooled = out[0]  # text_encoder_2 is CLIPTextModelWithProjection: text_embeds come first
            hidden.append(out.hidden_states[-2])
        h = w = self.resolution
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden[0].dtype, device=dev).repeat(len(prompts), 1)
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B,3,H,W) -> scaled latents (the distribution's mean, deterministic)."""
        vae = self.vae
        x = pixels.to(device=vae.device, dtype=vae.dtype)
        lat = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (lat - shift) * vae.config.scaling_factor

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)


def unet_forward(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """One UNet call with the family's conditioning (works on a DDP-wrapped UNet too)."""
    return unet(noisy, timesteps, encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)[0]


def pipeline_modules(pipe) -> dict[str, torch.nn.Module]:
    """The weighted components of a pipeline by name (UNet, VAE, text encoder(s))."""
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: m for n in names if isinstance(m := getattr(pipe, n, None), torch.nn.Module)}


def load_backbone(model: str | os.PathLike, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a pipeline from a local folder, a cached hub id (never downloads) or ``world``."""
    path, local = resolve_model(model)
    index = _read_model_index(path, local)
    cls_name = index.get("_class_name", "")
    if cls_name not in PIPELINE_CLASSES:
        raise SafealignError(f"{model} holds a {cls_name or 'unknown'} pipeline; safealign supports "
                             f"{' and '.join(sorted(PIPELINE_CLASSES))} (SD 1.x/2.x, SDXL)")
    require_safetensors(_index_file(path, local).parent, index, str(model))
    import logging as _logging

    import diffusers
    pipe_cls = getattr(diffusers, cls_name)
    kw = {}
    if cls_name == "StableDiffusionPipeline":
        kw.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
    import transformers
    prev = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(_logging.ERROR)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = pipe_cls.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise SafealignError(f"could not load the pipeline at {model}: {str(e).splitlines()[0]}") from None
    finally:
        diffusers.utils.logging.set_verbosity(prev)
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    check_finite(pipeline_modules(pipe), str(model))
    pipe.to(device)
    for m in (pipe.unet, pipe.vae, *([pipe.text_encoder] + ([pipe.text_encoder_2]
                                                              if getattr(pipe, "text_encoder_2", None) else []))):
        m.requires_grad_(False)
        m.eval()
    family = detect_family(index, dict(pipe.unet.config))
    return Backbone(pipe, family, str(model), path if local else None)
