"""Where the shipped world lives: ``weights/pipeline`` (``StableDiffusionPipeline.from_pretrained`` loads it) and
``weights/judge``, and the build record of a world pipeline."""

from __future__ import annotations

from pathlib import Path

from ..errors import SafealignError

WEIGHTS = Path(__file__).resolve().parent / "weights"


def pipeline_path() -> Path:
    """The shipped world pipeline folder (error if the weights are not built)."""
    p = WEIGHTS / "pipeline"
    if not (p / "model_index.json").is_file():
        raise SafealignError("the mini world's weights are not built; run `safealign world build`")
    return p


def judge_path() -> Path:
    """The shipped world judge folder (error if not built)."""
    p = WEIGHTS / "judge"
    if not (p / "judge.safetensors").is_file():
        raise SafealignError("the mini world's judge is not built; run `safealign world build`")
    return p


def manifest(path=None) -> dict:
    """The ``safealign.json`` of a world pipeline (the shipped one by default): build config, timings, metrics."""
    from ..artifacts import read_manifest
    return read_manifest(Path(path) if path is not None else pipeline_path(), kind="world")
