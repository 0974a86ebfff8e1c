"""Task fine-tuning with the plain diffusion loss; the scaffolding and the loop are :mod:`.engine`'s.

Modes (Modular LoRA, arXiv 2412.00357):
- ``modular``: the task LoRA is trained on the *clean* base; the safety LoRA is not loaded. At inference both are
  active (``safealign compose``): W* = W0 + dW_safe + dW_task.
- ``sequential``: the safety LoRA is fused into the base first and the task LoRA trained on top: the baseline that
  lets unsafe concepts come back.
- ``full``: every UNet weight of the safety-fused model is trained (the strongest backslide).
The safety LoRA file is only ever read, never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from ..artifacts import check_output_free, read_manifest, write_manifest
from ..backbone import Backbone, Conditioning, unet_forward
from ..configuration import to_dict
from ..data.dataset import _check_relative
from ..errors import SafealignError
from ..lora import WEIGHT_NAME, load_lora, lora_state_dict, save_lora, validate_for_model
from ..utils import derive_seed, logger, sha256_file
from ..validate import check_prompt
from .cache import conditioning_rows, default_cache_dir, encode_images_cached, encode_prompts_cached
from .config import FinetuneConfig
from .engine import (
    attach_lora,
    load_frozen,
    lora_spec,
    make_accelerator,
    prepare_trainable,
    run_training,
    save_artifact,
    tracking,
    work_folder,
)
from .losses import denoising_loss

ADAPTER = "safealign_task"
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captioned(data: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a folder (metadata.jsonl or .txt sidecars) or a parquet file."""
    p = Path(data)
    if not p.exists():
        raise SafealignError(f"--data {p} does not exist")
    if p.is_file():
        try:
            df = pd.read_parquet(p)
        except Exception:  # noqa: BLE001
            raise SafealignError(f"{p} is not a readable parquet file") from None
        col = next((c for c in ("text", "caption", "prompt") if c in df.columns), None)
        if "image" not in df.columns or col is None:
            raise SafealignError(f"{p} needs an 'image' column and a 'text' (or caption/prompt) column")
        items = [(_check_relative(r, p.parent), check_prompt(t, f"{p} row {i + 1} {col}"))
                 for i, (r, t) in enumerate(zip(df["image"], df[col]))]
    else:
        meta = p / "metadata.jsonl"
        images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXT)
        if meta.is_file():
            items = []
            for i, line in enumerate(meta.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = check_prompt(rec["text"], f"{meta} line {i} text")
                    items.append((_check_relative(rec["file_name"], p), text))
                except (json.JSONDecodeError, KeyError):
                    raise SafealignError(f"{meta} line {i} is not a JSON object with file_name and text") from None
            listed = {f for f, _ in items}
            extra = [f.name for f in images if f not in listed]
            if extra:
                raise SafealignError(f"captions in {meta} do not match the images: {extra[0]} has no caption "
                                     f"({len(extra)} such images)")
        else:
            items = []
            for f in images:
                cap = f.with_suffix(".txt")
                if not cap.is_file():
                    raise SafealignError(f"image {f.name} has no caption ({cap.name}); add one .txt per image or a "
                                         "metadata.jsonl")
                items.append((f, cap.read_text().strip()))
    if not items:
        raise SafealignError(f"--data {p} holds no captioned images")
    missing = [f for f, _ in items if not f.is_file()]
    if missing:
        raise SafealignError(f"the captions name {missing[0]} which does not exist ({len(missing)} missing); "
                             "the caption file does not match the images")
    return items


def fuse_safety(backbone: Backbone, safety: str) -> dict:
    """Fuse the safety LoRA into the UNet weights in place (W0 + dW_safe). Returns its identity."""
    sd, spec = load_lora(safety)
    validate_for_model(sd, backbone.unet, source=f"safety LoRA {safety}")
    from ..lora import delta_weight, lora_modules
    mods = dict(backbone.unet.named_modules())
    with torch.no_grad():
        for m, (a, b) in lora_modules(sd).items():
            w = mods[m].weight
            w += delta_weight(a, b, spec.scale_for(m)).reshape(w.shape).to(w.dtype)
    return lora_identity(safety)


def lora_identity(path: str) -> dict:
    p = Path(path)
    f = p / WEIGHT_NAME if p.is_dir() else p
    man = read_manifest(p if p.is_dir() else p.parent, required=False)
    return {"path": str(p), "checksum": sha256_file(f), "categories": (man or {}).get("categories"),
            "role": (man or {}).get("role")}


def _encode(cfg: FinetuneConfig, backbone: Backbone, items: list[tuple[Path, str]], safety: dict | None):
    """The images' latents and the captions' conditioning, cached per model (the safety-fused one apart)."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cfg.mode != "modular":
        cache = cache / ("fused-" + (safety or {}).get("checksum", "")[:12])  # fused weights: another model
    res = cfg.resolution or backbone.resolution
    latents = encode_images_cached(backbone, [f for f, _ in items], res, cache)
    return latents, encode_prompts_cached(backbone, [t for _, t in items], cache)


def _loss_fn(cfg: FinetuneConfig, backbone: Backbone, latents: torch.Tensor, cond: Conditioning):
    """The plain diffusion loss of one micro-step (batch, noise and timesteps drawn from a generator seeded by
    step); the noisy latents and the conditioning reach the UNet in its dtype, as in the DPO step."""
    unet, n = backbone.unet, latents.shape[0]
    dtype = next(unet.parameters()).dtype

    def loss_fn(model, step: int, micro: int, rank: int):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, micro, rank))
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        lat = latents[idx].to(unet.device)
        noise = torch.randn(lat.shape, generator=gen).to(unet.device)
        t = torch.randint(0, backbone.num_train_timesteps, (len(idx),), generator=gen).to(unet.device)
        c = conditioning_rows(cond, idx)
        noisy = backbone.add_noise(lat, noise, t).to(dtype)
        pred = unet_forward(model, noisy, t, c.to(unet.device, dtype=dtype))
        return denoising_loss(pred, backbone.target(lat, noise, t))
    return loss_fn


def finetune(cfg: FinetuneConfig, backbone: Backbone | None = None, accelerator=None) -> Path:
    """Train the task LoRA (or, ``full``, every UNet weight) on captioned images; returns the artifact folder."""
    final = check_output_free(cfg.output, cfg.overwrite)
    items = read_captioned(cfg.data)
    # trackers write into the work folder, which becomes the artifact (``<output>/logs``)
    logs = final.with_name(final.name + ".partial") / "logs"
    if accelerator is None:
        accelerator = make_accelerator(cfg, logs=logs)
    if backbone is None:
        backbone = load_frozen(cfg, accelerator)
    base_identity = backbone.identity()  # the clean base, before any fusing
    safety = None
    if cfg.safety:
        safety = lora_identity(cfg.safety)
        if cfg.mode in ("sequential", "full"):
            fuse_safety(backbone, cfg.safety)
    unet = backbone.unet
    latents, cond = _encode(cfg, backbone, items, safety)
    if cfg.mode == "full":
        adapter = None
        unet.requires_grad_(True)
    else:
        adapter = ADAPTER
        attach_lora(unet, lora_spec(cfg), ADAPTER, cfg.seed, cfg.lora_init)
    prepare_trainable(unet, cfg)
    work = work_folder(final, cfg, accelerator)
    with tracking(accelerator, cfg, "safealign-finetune"):
        result = run_training(cfg, accelerator, unet, adapter, _loss_fn(cfg, backbone, latents, cond), work,
                              desc=f"finetune {cfg.mode}")
    unet.eval()
    metrics = {**{f"train/{k}": v for k, v in result.final_metrics.items()}, "steps_per_s": result.steps_per_s,
               "train_seconds": result.seconds, "images": latents.shape[0]}

    def write(folder: Path) -> None:
        if adapter is not None:
            save_lora(folder, lora_state_dict(unet, adapter), lora_spec(cfg))
            kind, extra = "lora", {"role": "task", "weight_name": WEIGHT_NAME, "lora": lora_spec(cfg).metadata()}
        else:
            unet.disable_gradient_checkpointing() if cfg.gradient_checkpointing else None
            backbone.pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
            if backbone.plugin is not None and backbone.path:  # a fine-tuned plugin model is still the plugin's
                backbone.plugin.mark_pipeline(backbone.path, folder / "pipeline", role="task-full")
            kind, extra = "pipeline", {"role": "task-full"}
        write_manifest(folder, kind, mode=cfg.mode, safety=safety, trained_on_safety_fused=cfg.mode != "modular",
                       base_model=base_identity, config=to_dict(cfg), metrics=metrics, **extra)
    save_artifact(final, work, cfg, accelerator, {"train": result.history}, write)
    if accelerator.is_main_process:
        logger.info("task %s written to %s", cfg.mode, final)
    return final
