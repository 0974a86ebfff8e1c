"""The embedded mini world: a tiny text-to-image model, its renderer and its judge, all runnable on a CPU.

- :mod:`.scene`   the grammar: categories, hazard concepts and their benign twins, scenes, prompts, pairs
- :mod:`.render`  scene -> image (ground truth)
- :mod:`.model`   the Stable-Diffusion-shaped pipeline: architecture, loading, sampling
- :mod:`.judge`   the CNN judge: hazard categories + attributes
- :mod:`.train`   ``build()``: retrain everything from scratch, seeded
- :mod:`.quality` the measured figures stored with the weights

The shipped weights live in ``weights/pipeline`` (``StableDiffusionPipeline.from_pretrained`` loads it) and
``weights/judge``.
"""

from pathlib import Path

from .scene import (BACKGROUNDS, BENIGN, CATEGORIES, COLOURS, CONCEPTS, HAZARDS, OBJECTS, POSITIONS, TWINS,
                    PromptPair, Scene, benign_prompts, category_of, hazard_of, make_pair, parse_prompt, sample_scene,
                    scene_prompt, twin_of)

WEIGHTS = Path(__file__).resolve().parent / "weights"

__all__ = ["WEIGHTS", "pipeline_path", "judge_path", "manifest", "CATEGORIES", "CONCEPTS", "HAZARDS", "TWINS",
           "BENIGN", "OBJECTS", "COLOURS", "BACKGROUNDS", "POSITIONS", "Scene", "PromptPair", "sample_scene",
           "scene_prompt", "benign_prompts", "make_pair", "parse_prompt", "category_of", "twin_of", "hazard_of",
           "render", "load_judge", "load_pipeline"]


def pipeline_path() -> Path:
    """The shipped world pipeline folder (error if the weights are not built)."""
    from ..errors import SafealignError
    p = WEIGHTS / "pipeline"
    if not (p / "model_index.json").is_file():
        raise SafealignError("the mini world's weights are not built; run `safealign world build`")
    return p


def judge_path() -> Path:
    """The shipped world judge folder (error if not built)."""
    from ..errors import SafealignError
    p = WEIGHTS / "judge"
    if not (p / "judge.safetensors").is_file():
        raise SafealignError("the mini world's judge is not built; run `safealign world build`")
    return p


def manifest(path=None) -> dict:
    """The ``safealign.json`` of a world pipeline (the shipped one by default): build config, timings, metrics."""
    from ..artifacts import read_manifest
    return read_manifest(Path(path) if path is not None else pipeline_path(), kind="world")


def __getattr__(name: str):  # lazy: torch/diffusers load only when used
    if name == "render":
        from .render import render
        return render
    if name == "load_judge":
        from .judge import load_judge
        return load_judge
    if name == "load_pipeline":
        from .model import load_pipeline
        return load_pipeline
    raise AttributeError(name)
