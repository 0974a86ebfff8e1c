"""The one image sampler: seeded per image, so an image does not depend on which others share its batch.

Every stage that draws images (paired data, validation, evaluation, audit, the world's task check) calls
:func:`generate` with one seed per image and a :class:`SamplingOptions`. ``None`` in the options means "the
model's default", resolved once by :meth:`SamplingOptions.resolve` against
:meth:`safealign.backbone.Backbone.sampling_defaults`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch

from .configuration import field
from .errors import SafealignError


def _whole_at_least_one(v: object) -> bool:
    return (not isinstance(v, bool) and isinstance(v, Real) and math.isfinite(v) and float(v).is_integer()
            and v >= 1)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampler steps and classifier-free guidance; ``None``: the model's default."""

    steps: int | None = None
    guidance: float | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and not _whole_at_least_one(self.steps):
            raise SafealignError(f"--steps (sampler steps) must be a whole number >= 1, got {self.steps!r}")
        if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(self.guidance, Real)
                                          or not (math.isfinite(self.guidance) and self.guidance >= 0)):
            raise SafealignError(f"--guidance must be a finite number >= 0 (0: no guidance), got {self.guidance!r}")

    def resolve(self, defaults: SamplingOptions) -> SamplingOptions:
        """These options with every ``None`` taken from ``defaults`` (a model's)."""
        return SamplingOptions(self.steps if self.steps is not None else defaults.steps,
                               self.guidance if self.guidance is not None else defaults.guidance)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance}


@dataclasses.dataclass(frozen=True)
class SamplingFields:
    """The two sampler options every config that draws images shares (``--steps``, ``--guidance``)."""

    steps: int | None = field(None, "sampler steps (default: the model's own; 30 for a plain diffusers model)")
    guidance: float | None = field(None, "classifier-free guidance scale, 0 for none (default: the model's own; "
                                         "7.5 for a plain diffusers model)")

    @property
    def sampling(self) -> SamplingOptions:
        return SamplingOptions(self.steps, self.guidance)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], options: SamplingOptions, *, batch_size: int = 16,
             height: int | None = None, width: int | None = None, progress_desc: str | None = None) -> np.ndarray:
    """Images for ``prompts`` as (N, H, W, 3) uint8; image i uses a CPU generator seeded with ``seeds[i]``.

    ``options`` must be resolved (no ``None``). ``progress_desc`` shows a progress bar over batches."""
    if options.steps is None or options.guidance is None:
        raise ValueError("generate() needs resolved SamplingOptions (call .resolve(backbone.sampling_defaults()))")
    SamplingOptions(options.steps, options.guidance)  # re-validated: options may have been built field by field
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    from .validate import check_prompt, check_seed
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        check_prompt(p, f"prompt {i + 1}", allow_empty=True)
        check_seed(s, f"seed of image {i + 1}")
    from .utils import progress
    size = {k: v for k, v in (("height", height), ("width", width)) if v}
    starts = range(0, len(prompts), batch_size)
    out = []
    for i in (progress(starts, desc=progress_desc) if progress_desc is not None else starts):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        imgs = pipe(list(prompts[i:i + batch_size]), num_inference_steps=int(options.steps),
                    guidance_scale=options.guidance, generator=gens, output_type="np", **size).images
        out.append(np.clip(np.rint(imgs * 255), 0, 255).astype(np.uint8))
    if not out:
        return np.zeros((0, height or 0, width or 0, 3), np.uint8)
    return np.concatenate(out)


def to_pil(images: np.ndarray) -> list:
    """(N, H, W, 3) uint8 -> PIL images."""
    from PIL import Image
    return [Image.fromarray(a) for a in images]
