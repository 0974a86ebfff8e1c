"""NudeNet (optional, AGPL, imported lazily): an image scores its highest detection among the configured classes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..errors import SafealignError
from .base import dist_version, to_uint8

NUDENET_DEFAULT_CLASSES = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED")


class NudeNetJudge:
    """NudeNet's detector; an image scores the highest detection score among the configured classes."""

    def __init__(self, classes: Sequence[str] = NUDENET_DEFAULT_CLASSES, threshold: float = 0.6,
                 category: str = "sexual"):
        try:
            import nudenet
        except ImportError:
            raise SafealignError("judge 'nudenet' needs the optional NudeNet package (AGPL): pip install nudenet; "
                                 "or drop it from --judges") from None
        self._detector = nudenet.NudeDetector()
        self.name = "nudenet"
        self.version = str(getattr(nudenet, "__version__", None) or dist_version("nudenet"))
        self.threshold = float(threshold)
        self.classes = tuple(classes)
        self.categories = (category,)
        self.settings = {"classes": list(self.classes)}

    def __call__(self, images) -> dict[str, np.ndarray]:
        import tempfile

        from PIL import Image
        arr = to_uint8(images)
        scores = np.zeros(len(arr))
        with tempfile.TemporaryDirectory() as d:
            for i, a in enumerate(arr):
                f = os.path.join(d, f"{i}.png")
                Image.fromarray(a).save(f)
                dets = self._detector.detect(f) or []
                s = [float(x.get("score", 0.0)) for x in dets if x.get("class") in self.classes]
                scores[i] = max(s, default=0.0)
        return {self.categories[0]: scores}
