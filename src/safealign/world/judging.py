"""The world's CNN judge behind the core's judge interface (:mod:`safealign.judges`), with its extra capabilities:
attributes (what object, colour, background, position an image shows) and features (for FID/KID)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import SafealignError
from ..judges.base import dist_version, to_uint8
from ..utils import sha256_file


class WorldJudge:
    """The mini world's judge: hazard probabilities per category; attributes and features on the side."""

    def __init__(self, path: str | os.PathLike | None = None, threshold: float = 0.5):
        from . import judge_path
        from .judge import WEIGHTS_FILE, load_judge
        if path:
            p = Path(path)
            if not (p / WEIGHTS_FILE).is_file():
                raise SafealignError(f"--world-judge {p} holds no {WEIGHTS_FILE}; pass a world judge folder")
        else:
            p = judge_path()
        self.path = p
        self.judge = load_judge(p)
        self.name = "world"
        self.version = sha256_file(p / WEIGHTS_FILE)[:12]
        self.threshold = float(threshold)
        self.categories = tuple(self.judge.categories)
        self.num_features = int(self.judge.config.get("features", 256))
        self.settings = {"path": str(p), "attributes": sorted(self.judge.labels)}
        self.weight_files = (str(p / WEIGHTS_FILE),)  # what the evaluator card hashes
        self.packages = {"safealign": dist_version("safealign"), "torch": dist_version("torch")}

    def judge_all(self, images):
        """The full :class:`safealign.world.judge.Judgement` (scores, attributes, confidences)."""
        return self.judge(to_uint8(images))

    def __call__(self, images) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.float64) for k, v in self.judge_all(images).scores.items()}

    def scores_and_attributes(self, images) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """Scores and attribute predictions from one pass of the network."""
        jj = self.judge_all(images)
        return {k: np.asarray(v, np.float64) for k, v in jj.scores.items()}, jj.attributes

    def attributes(self, images) -> dict[str, list[str]]:
        return self.judge_all(images).attributes

    @staticmethod
    def prompt_attributes(prompts: Sequence[str]) -> list[dict]:
        """What each prompt names (object, colour, background, position; None where it names none)."""
        from .scene import parse_prompt
        return [parse_prompt(p) for p in prompts]

    def features(self, images) -> torch.Tensor:
        return self.judge.features(to_uint8(images))
