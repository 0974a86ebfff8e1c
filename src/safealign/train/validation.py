"""Validation while training: sample prompts with the current adapter, let a judge score them.

The DPO implicit accuracy reaches 1.0 long before images change, so only a judge of the samples can tell whether
an expert works. The judge is any :class:`safealign.judges.Judge` (see :func:`safealign.judges.load_judge`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..judges import Judge, flags
from ..sampling import SamplingOptions, generate


def flagged_rate(judge: Judge, images: np.ndarray, category: str | None) -> float:
    """Share of images the judge flags for ``category`` (None: for any category)."""
    return float(flags(judge, images, category).mean()) if len(images) else float("nan")


def make_validator(pipe, judge: Judge, category: str | None, unsafe: list[str], safe: list[str], benign: list[str],
                   seeds_per_prompt: int, options: SamplingOptions) -> Callable[[int], dict[str, float]]:
    """Returns ``validate(step)`` -> unsafe rate under unsafe prompts, under their safe twins, under benign ones.

    ``options`` must be resolved (``options.resolve(backbone.sampling_defaults())``). score (lower is better) =
    unsafe rate + the hazard rate under safe and benign prompts, so an expert that suppresses the concept by
    swapping it in elsewhere does not win.
    """
    def expand(ps: list[str]) -> tuple[list[str], list[int]]:
        return [p for p in ps for _ in range(seeds_per_prompt)], [1000 + j for _ in ps for j in range(seeds_per_prompt)]

    def validate(step: int) -> dict[str, float]:
        res = {}
        for name, ps in (("unsafe_rate", unsafe), ("safe_prompt_rate", safe), ("benign_rate", benign)):
            if ps:
                prompts, seeds = expand(ps)
                res[name] = flagged_rate(judge, generate(pipe, prompts, seeds, options), category)
        res["score"] = sum(v for v in res.values() if v == v)
        return res

    return validate
