"""User judges: a callable ``f(images) -> {category: probabilities}`` named by an entry point of group
``safealign.judges`` or by ``package.module:callable`` (a class or factory is called with no arguments)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from ..errors import SafealignError
from ..utils import sha256_file
from .base import Judge, dist_version, to_uint8

ENTRY_POINT_GROUP = "safealign.judges"


class CallableJudge:
    """A user callable ``f(images) -> {category: probs}`` (or an object with ``.scores``), with an identity."""

    def __init__(self, fn: Callable, name: str, threshold: float = 0.5):
        self.fn = fn
        self.name = str(getattr(fn, "name", name))
        self.version = str(getattr(fn, "version", None) or _module_version(fn))
        self.threshold = float(getattr(fn, "threshold", threshold))
        self.categories = tuple(getattr(fn, "categories", ()))
        self.settings = {"spec": name}
        self.weight_files = tuple(str(f) for f in getattr(fn, "weight_files", ()))  # hashed by the evaluator card
        top = (getattr(fn, "__module__", "") or "").split(".")[0]
        self.packages = {top: _module_version(fn)} if top else {}

    def __call__(self, images) -> dict[str, np.ndarray]:
        arr = to_uint8(images)
        from PIL import Image
        out = self.fn([Image.fromarray(a) for a in arr])
        out = getattr(out, "scores", out)
        if not isinstance(out, dict):
            raise SafealignError(f"judge {self.name} returned {type(out).__name__}; a judge returns "
                                 "{category: probabilities}")
        res = {str(k): np.asarray(v, np.float64).reshape(-1) for k, v in out.items()}
        for k, v in res.items():
            if len(v) != len(arr):
                raise SafealignError(f"judge {self.name} returned {len(v)} scores for {k!r} on {len(arr)} images")
        if not self.categories:
            self.categories = tuple(res)
        return res


def _module_version(fn) -> str:
    mod = getattr(fn, "__module__", "") or ""
    top = mod.split(".")[0]
    v = dist_version(top) if top else "unknown"
    if v == "unknown" and mod:
        try:
            f = importlib.import_module(mod).__file__
            v = "sha:" + sha256_file(f)[:12] if f else v
        except (ImportError, OSError):
            pass
    return v


def _entry_point(name: str):
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep
    return None


def load_custom(spec: str, threshold: float = 0.5) -> CallableJudge:
    """An entry point of group ``safealign.judges`` or ``package.module:callable`` (a class or factory is called
    with no arguments)."""
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise SafealignError(f"cannot import judge {spec!r} ({e}); pass package.module:callable") from None
    else:
        ep = _entry_point(spec)
        if ep is None:
            raise SafealignError(f"judge {spec!r} is unknown: not world, nudenet, q16 or clip, no entry point of "
                                 "group safealign.judges, and not package.module:callable")
        obj = ep.load()
    if isinstance(obj, type) or getattr(obj, "_safealign_factory", False):
        obj = obj()
    if not callable(obj):
        raise SafealignError(f"judge {spec!r} is not callable")
    if isinstance(obj, Judge):
        return obj  # already speaks the protocol
    return CallableJudge(obj, spec, threshold)
