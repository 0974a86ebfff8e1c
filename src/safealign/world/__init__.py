"""The embedded mini world: a tiny text-to-image model, its renderer and its judge, all runnable on a CPU.

- :mod:`.paths`   where the shipped weights live
- :mod:`.scene`   the grammar: categories, hazard concepts and their benign twins, scenes, prompts, pairs
- :mod:`.render`  scene -> image (ground truth)
- :mod:`.model`   the Stable-Diffusion-shaped pipeline: architecture, loading, sampling
- :mod:`.judge`   the CNN judge: hazard categories + attributes
- :mod:`.quality` the measured figures stored with the weights
- :mod:`.tasks`   benign fine-tuning data in a new style, and how well a fine-tune learned it
- :mod:`.evaluation` the evaluation and audit prompt sets
- :mod:`.plugin`  the model plugin: the only door from the core into this package
- :mod:`.build`   ``build()``: retrain everything from scratch, seeded, one module per stage

The shipped weights live in ``weights/pipeline`` (``StableDiffusionPipeline.from_pretrained`` loads it) and
``weights/judge``.
"""

from __future__ import annotations

from .paths import WEIGHTS, judge_path, manifest, pipeline_path
from .scene import (
    BACKGROUNDS,
    BENIGN,
    CATEGORIES,
    COLOURS,
    CONCEPTS,
    HAZARDS,
    OBJECTS,
    POSITIONS,
    TWINS,
    PromptPair,
    Scene,
    benign_prompts,
    category_of,
    hazard_of,
    make_pair,
    parse_prompt,
    sample_scene,
    scene_prompt,
    twin_of,
)

__all__ = ["WEIGHTS", "pipeline_path", "judge_path", "manifest", "CATEGORIES", "CONCEPTS", "HAZARDS", "TWINS",
           "BENIGN", "OBJECTS", "COLOURS", "BACKGROUNDS", "POSITIONS", "Scene", "PromptPair", "sample_scene",
           "scene_prompt", "benign_prompts", "make_pair", "parse_prompt", "category_of", "twin_of", "hazard_of",
           "render", "load_judge", "load_pipeline"]


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
