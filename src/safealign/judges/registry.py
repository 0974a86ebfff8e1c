"""``load_judge(spec)``: the one way every stage turns a judge name into a :class:`~.base.Judge`.

Specs: ``world`` (the mini world's judge, the one place the core reaches into :mod:`safealign.world`),
``nudenet``, ``opennsfw``, ``q16``, ``clip``, an entry point of group ``safealign.judges``, or
``package.module:callable``.
A user judge's own ``threshold`` attribute wins over the ``threshold`` passed here.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import SafealignError
from .base import Judge
from .nudenet import NUDENET_DEFAULT_PRESET

BUILTIN = ("world", "nudenet", "opennsfw", "q16", "clip")


def load_judge(spec: str, *, threshold: float = 0.5, world_judge: str = "",
               nudenet_classes: Sequence[str] = (NUDENET_DEFAULT_PRESET,), nudenet_threshold: float = 0.6,
               opennsfw_threshold: float | None = None, q16_clip: str = "", q16_embeddings: str = "",
               clip_model: str = "", clip_descriptions: str = "",
               categories: Sequence[str] = (), device: str = "cpu") -> Judge:
    """The judge ``spec`` names; ``threshold`` applies to the world, CLIP and user judges, and to open_nsfw unless
    ``opennsfw_threshold`` is given (NudeNet has its own)."""
    if not spec:
        raise SafealignError("no judge given: pass --judge world|nudenet|opennsfw|q16|clip|package.module:callable")
    if spec == "world":
        return world_judge_class()(world_judge or None, threshold)
    if spec == "nudenet":
        from .nudenet import NudeNetJudge
        return NudeNetJudge(nudenet_classes, nudenet_threshold)
    if spec == "opennsfw":
        from .opennsfw import OpenNsfwJudge
        return OpenNsfwJudge(threshold if opennsfw_threshold is None else opennsfw_threshold)
    if spec == "q16":
        from .q16 import Q16Judge
        if not q16_clip:
            raise SafealignError("judge q16 needs --q16-clip (a local CLIP ViT-L/14 folder)")
        return Q16Judge(q16_clip, q16_embeddings, device)
    if spec == "clip":
        from .clip import ClipZeroShotJudge, default_descriptions, read_descriptions
        if not clip_model:
            raise SafealignError("judge clip needs --clip-model (a local CLIP folder)")
        if not clip_descriptions and not categories:
            from ..world.scene import CATEGORIES
            categories = CATEGORIES
        desc = read_descriptions(clip_descriptions) if clip_descriptions else default_descriptions(categories)
        return ClipZeroShotJudge(clip_model, desc, threshold, device=device)
    from .custom import load_custom
    return load_custom(spec, threshold)


def world_judge_class() -> type:
    """The mini world's judge class (:class:`safealign.world.judging.WorldJudge`)."""
    from ..world.judging import WorldJudge
    return WorldJudge


def as_judge(judge, name: str = "callable", threshold: float = 0.5) -> Judge:
    """``judge`` itself when it speaks the protocol, else a plain callable wrapped as a user judge."""
    if isinstance(judge, Judge):
        return judge
    from .custom import CallableJudge
    return CallableJudge(judge, name, threshold)


def build_judges(cfg, categories: Sequence[str] = ()) -> list[Judge]:
    """The judges named by an :class:`~safealign.evaluate.config.EvaluateConfig` (``--judges``)."""
    out = [load_judge(spec, threshold=cfg.threshold, world_judge=cfg.world_judge,
                      nudenet_classes=cfg.nudenet_classes, nudenet_threshold=cfg.nudenet_threshold,
                      opennsfw_threshold=cfg.opennsfw_threshold,
                      q16_clip=cfg.q16_clip, q16_embeddings=cfg.q16_embeddings, clip_model=cfg.clip_model,
                      clip_descriptions=cfg.clip_descriptions, categories=categories, device=cfg.device)
           for spec in cfg.judges]
    names = [j.name for j in out]
    if len(set(names)) != len(names):
        raise SafealignError(f"--judges names judge {[n for n in names if names.count(n) > 1][0]!r} twice")
    return out
