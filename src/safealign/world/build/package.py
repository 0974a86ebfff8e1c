"""The world folder a build writes and reads: ``pipeline/`` (a standard fp16 StableDiffusionPipeline folder with
its ``safealign.json`` and model card) and ``judge/``; and the VAE and judge of an existing one, for
``--reuse-vae-judge``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...artifacts import read_manifest, write_manifest
from ...configuration import to_dict
from ...errors import SafealignError
from .. import model as M
from ..judge import Judge, load_judge
from .config import WorldConfig


def load_vae_judge(source: str | os.PathLike):
    """The VAE and judge of an existing world folder (``pipeline/`` + ``judge/``): returns (vae, judge, the VAE's
    build metrics, a record of who made them), the record passed on from a folder that itself reused them."""
    from diffusers import AutoencoderKL

    world_dir = Path(source)
    if not (world_dir / "pipeline" / "vae").is_dir() or not (world_dir / "judge").is_dir():
        raise SafealignError(f"--reuse-vae-judge {world_dir} is not a world folder (needs pipeline/vae and judge/); "
                             "pass the folder `safealign world build --output` wrote")
    src = read_manifest(world_dir / "pipeline")
    vae = AutoencoderKL.from_pretrained(world_dir / "pipeline" / "vae", torch_dtype=torch.float32).eval()
    vae.requires_grad_(False)
    judge = load_judge(world_dir / "judge")
    metrics = {k: v for k, v in src.get("metrics", {}).items() if k.startswith("vae/")}
    maker = src.get("vae_judge_reused") or src
    reused = {"from": str(source), "command": maker.get("command"), "config": maker.get("config"),
              "timings_s": maker.get("timings_s")}
    return vae, judge, metrics, reused


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet) -> None:
    """The components as a standard pipeline folder, weights in fp16 (the modules are cast in place)."""
    pipe = M.assemble_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    load_as_float32(folder)


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


def build_command(cfg: WorldConfig, reused: bool) -> str:
    """The ``safealign world build`` command line that gives ``cfg``."""
    return ("safealign world build" + (" --quick" if cfg.quick else "")
            + (f" --seed {cfg.seed}" if cfg.seed else "")
            + (f" --threads {cfg.threads}" if cfg.threads != 2 else "")
            + (f" --unet-steps {cfg.unet_steps}" if cfg.unet_steps != cfg.default().unet_steps else "")
            + (" --reuse-vae-judge DIR" if reused else ""))


def parameter_counts(vae, text_encoder, unet, judge: Judge) -> dict[str, int]:
    return {"unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters()),
            "judge_params": sum(p.numel() for p in judge.net.parameters())}


def write_manifests(folder: Path, cfg: WorldConfig, metrics: dict, timings: dict[str, float],
                    parameters: dict[str, int], reused: dict | None) -> dict:
    """``judge/safealign.json``, ``pipeline/safealign.json`` (adds ``package_size_mb`` to ``metrics``) and the
    pipeline's model card; returns the pipeline's manifest."""
    common = dict(config=to_dict(cfg), timings_s={k: round(v, 1) for k, v in timings.items()},
                  command=build_command(cfg, reused is not None), parameters=parameters, threads=cfg.threads)
    if reused:
        common["vae_judge_reused"] = reused
    write_manifest(folder / "judge", "judge", metrics={k: v for k, v in metrics.items() if k.startswith("judge")},
                   **common)
    metrics["package_size_mb"] = round(_size_mb(folder), 2)
    manifest = write_manifest(folder / "pipeline", "world", metrics=metrics,
                              sampling={"scheduler": "DPMSolverMultistepScheduler", "steps": cfg.sample_steps,
                                        "guidance": cfg.guidance, "resolution": M.IMAGE_SIZE},
                              **common)
    (folder / "pipeline" / "README.md").write_text(model_card(manifest))
    return manifest


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2 ** 20


def model_card(manifest: dict) -> str:
    """The pipeline folder's README: what it is, how it was made, its headline figures and sampling defaults."""
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
