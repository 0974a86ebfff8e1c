"""Task fine-tuning with the plain diffusion loss, sharing the DPO trainer's engine (one loop, two losses).

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
import shutil
from pathlib import Path

import pandas as pd
import torch

from ..artifacts import atomic_dir, check_output_free, read_manifest, write_manifest
from ..backbone import Backbone, load_backbone, unet_forward
from ..configuration import to_dict
from .config import FinetuneConfig
from ..data.dataset import _check_relative
from ..errors import SafealignError
from ..lora import WEIGHT_NAME, add_lora, load_lora, lora_state_dict, save_lora, validate_for_model
from ..utils import derive_seed, logger, sha256_file
from .cache import default_cache_dir, encode_images_cached, encode_prompts_cached
from .dpo import lora_spec
from .engine import run_training
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
        items = [(_check_relative(r, p.parent), str(t)) for r, t in zip(df["image"], df[col])]
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
                    items.append((_check_relative(rec["file_name"], p), str(rec["text"])))
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


def _mark_world_pipeline(backbone: Backbone, folder: Path) -> None:
    """A fully fine-tuned world model is still a world model: keep its family marker and sampling defaults."""
    if backbone.family != "world":
        return
    from ..backbone import resolve_model
    src = read_manifest(Path(resolve_model(backbone.source)[0]), required=False) or {}
    write_manifest(folder, "world", role="task-full", sampling=src.get("sampling", {}),
                   derived_from={"source": backbone.source, "command": src.get("command")})


def finetune(cfg: FinetuneConfig, backbone: Backbone | None = None, accelerator=None) -> Path:
    from accelerate import Accelerator
    final = check_output_free(cfg.output, cfg.overwrite)
    items = read_captioned(cfg.data)
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                                  gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    if backbone is None:
        backbone = load_backbone(cfg.model, device=accelerator.device)
    base_identity = backbone.identity()  # the clean base, before any fusing
    safety = None
    if cfg.safety:
        safety = lora_identity(cfg.safety)
        if cfg.mode in ("sequential", "full"):
            fuse_safety(backbone, cfg.safety)
    unet = backbone.unet
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cfg.mode != "modular":
        cache = cache / ("fused-" + (safety or {}).get("checksum", "")[:12])  # fused weights: another model
    res = cfg.resolution or backbone.resolution
    latents = encode_images_cached(backbone, [f for f, _ in items], res, cache)
    cond = encode_prompts_cached(backbone, [t for _, t in items], cache)
    if cfg.mode == "full":
        adapter = None
        unet.requires_grad_(True)
    else:
        adapter = ADAPTER
        torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
        add_lora(unet, lora_spec(cfg), ADAPTER)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    n = latents.shape[0]
    work = final.with_name(final.name + ".partial")
    if work.exists() and not cfg.resume:
        shutil.rmtree(work)

    def loss_fn(model, step: int, micro: int, rank: int):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, micro, rank))
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        lat = latents[idx].to(unet.device)
        noise = torch.randn(lat.shape, generator=gen).to(unet.device)
        t = torch.randint(0, backbone.num_train_timesteps, (len(idx),), generator=gen).to(unet.device)
        c = type(cond)(cond.encoder_hidden_states[idx],
                       {k: v[idx] for k, v in cond.added_cond_kwargs.items()} if cond.added_cond_kwargs else None)
        pred = unet_forward(model, backbone.add_noise(lat, noise, t), t, c.to(unet.device))
        return denoising_loss(pred, backbone.target(lat, noise, t))

    work.mkdir(parents=True, exist_ok=True)
    result = run_training(cfg, accelerator, unet, adapter, loss_fn, work, desc=f"finetune {cfg.mode}")
    unet.eval()
    metrics = {**{f"train/{k}": v for k, v in result.final_metrics.items()}, "steps_per_s": result.steps_per_s,
               "train_seconds": result.seconds, "images": n}
    if accelerator.is_main_process:
        with atomic_dir(final, overwrite=cfg.overwrite, work=work) as tmp:
            shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
            shutil.rmtree(tmp / "best", ignore_errors=True)
            if adapter is not None:
                save_lora(tmp, lora_state_dict(unet, adapter), lora_spec(cfg))
                kind, extra = "lora", {"role": "task", "weight_name": WEIGHT_NAME, "lora": lora_spec(cfg).metadata()}
            else:
                unet.disable_gradient_checkpointing() if cfg.gradient_checkpointing else None
                backbone.pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
                _mark_world_pipeline(backbone, tmp / "pipeline")
                kind, extra = "pipeline", {"role": "task-full"}
            (tmp / "history.json").write_text(json.dumps({"train": result.history}, indent=1))
            write_manifest(tmp, kind, mode=cfg.mode, safety=safety, trained_on_safety_fused=cfg.mode != "modular",
                           base_model=base_identity, config=to_dict(cfg), metrics=metrics, **extra)
        logger.info("task %s written to %s", cfg.mode, final)
    return final
