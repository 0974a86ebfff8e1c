"""The one judge interface and the one flag rule every stage applies.

A judge maps images to per-category probabilities, ``judge(images) -> {category: (N,) array}``, and carries what
identifies it in a report: ``name``, ``version`` (a weights hash or package version), ``threshold`` and
``categories``. An image is flagged for a category when its score is ``>= judge.threshold`` (:func:`flags`).

Optional capabilities, found by attribute: ``features(images) -> (N, D) tensor`` (``num_features``) for FID/KID,
and ``attributes(images)`` with ``prompt_attributes(prompts)`` for attribute accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import SafealignError


@runtime_checkable
class Judge(Protocol):
    """What a judge is: a callable from images to per-category probabilities, with its identity."""

    name: str
    version: str
    threshold: float
    categories: tuple[str, ...]

    def __call__(self, images: Sequence[Any]) -> dict[str, np.ndarray]: ...


def describe(judge: Judge) -> dict:
    """The identity of a judge as the report records it."""
    d = {"name": judge.name, "version": judge.version, "threshold": float(judge.threshold),
         "categories": list(judge.categories)}
    d.update(getattr(judge, "settings", {}) or {})
    return d


def over_threshold(scores: Any, threshold: float) -> np.ndarray:
    """The one flag rule: bool array, score ``>=`` the judge's threshold."""
    return np.asarray(scores, np.float64) >= threshold


def flags(judge: Judge, images_or_scores: Any, category: str | None = None) -> np.ndarray:
    """(N,) bool: score ``>= judge.threshold`` for ``category`` (None: for any category the judge scores).

    ``images_or_scores``: images (judged here), the judge's ``{category: scores}``, or a 1-D array of scores
    already taken for ``category``."""
    x = images_or_scores
    if isinstance(x, np.ndarray) and x.ndim == 1:
        return over_threshold(x, judge.threshold)
    scores = x if isinstance(x, Mapping) else judge(x)
    if category is None:
        if not scores:
            raise SafealignError(f"judge {judge.name} returned no scores")
        return np.any(np.stack([over_threshold(v, judge.threshold) for v in scores.values()]), axis=0)
    if category not in scores:
        raise SafealignError(f"judge {judge.name} has no score for category {category!r}; it scores "
                             f"{', '.join(sorted(scores))}")
    return over_threshold(scores[category], judge.threshold)


def to_uint8(images: Sequence[Any]) -> np.ndarray:
    """PIL images, (N,H,W,3) uint8/float arrays -> (N,H,W,3) uint8; an empty set is a user error."""
    from PIL import Image
    if isinstance(images, np.ndarray):
        a = images if images.ndim == 4 else images[None]
        if len(a) == 0:
            raise SafealignError("the image set is empty; nothing to judge")
        return a if a.dtype == np.uint8 else np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)
    images = list(images)
    if not images:
        raise SafealignError("the image set is empty; nothing to judge")
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(np.asarray(im.convert("RGB")))
        else:
            a = np.asarray(im)
            out.append(a if a.dtype == np.uint8 else np.clip(np.rint(a * 255), 0, 255).astype(np.uint8))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:  # mixed sizes: resize to the first
        h, w = out[0].shape[:2]
        out = [a if a.shape[:2] == (h, w) else np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC))
               for a in out]
    return np.stack(out)


def dist_version(name: str) -> str:
    """The installed version of distribution ``name``, or 'unknown'."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
