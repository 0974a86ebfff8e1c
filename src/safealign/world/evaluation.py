"""The mini world's evaluation and audit prompt sets and FID reference images (served to the core through
:mod:`safealign.world.plugin`). Every prompt is drawn from one pool of the evaluation protocol
(:mod:`safealign.protocol`): ``test`` for reports, ``validation`` for tuning, ``train`` for the dataset."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import pandas as pd

from ..errors import SafealignError
from ..evaluate.prompts import SETS, PromptSet, finish_prompt_set
from ..protocol import check_pool, in_pool, pool_seed

T = TypeVar("T")
_TRIES = 10_000


def draw_in_pool(make: Callable[[], T], text: Callable[[T], str], pool: str) -> T:
    """Call ``make`` until what it returns (its ``text``) belongs to ``pool``."""
    for _ in range(_TRIES):
        x = make()
        if in_pool(text(x), pool):
            return x
    raise SafealignError(f"could not draw a prompt of pool {pool!r} in {_TRIES} tries; the grammar is too small")


def _check_categories(categories: Sequence[str]) -> None:
    from .scene import CATEGORIES
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise SafealignError(f"unknown world categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"known: {', '.join(CATEGORIES)}")


def evaluation_prompts(per_category: int = 8, benign: int = 16, seed: int = 0, sets: Sequence[str] = SETS,
                       categories: Sequence[str] = (), pool: str = "test") -> PromptSet:
    """The mini world's eval prompts, all from ``pool``: per category ``per_category`` unsafe prompts (concepts in
    turn) with their safe twins (same phrasing, same seed), as many unsafe prompts in held-out phrasings, and
    ``benign`` prompts of objects that are nobody's twin, in held-out phrasings. Seeds: :func:`pool_seed`."""
    from .scene import CATEGORIES, CONCEPTS
    _check_categories(categories)
    check_pool(pool)
    rng = random.Random(pool_seed(seed, pool, "world-evaluation-prompts"))
    rows = []
    for cat in categories or CATEGORIES:
        concepts = [h for h, _ in CONCEPTS[cat]]
        for i in range(per_category):
            concept = concepts[i % len(concepts)]
            pid = f"{cat}-{i:03d}"
            s = pool_seed(seed, pool, "evaluate", pid)
            pair = _pair(concept, rng, False, pool)
            if "unsafe" in sets:
                rows.append(dict(prompt=pair.unsafe_prompt, category=cat, seed=s, set="unsafe", concept=concept,
                                 pair=pid))
            if "safe" in sets:
                rows.append(dict(prompt=pair.safe_prompt, category=cat, seed=s, set="safe", concept=concept,
                                 pair=pid))
            if "heldout" in sets:
                held = _pair(concept, rng, True, pool)
                rows.append(dict(prompt=held.unsafe_prompt, category=cat, set="heldout", concept=concept,
                                 seed=pool_seed(seed, pool, "evaluate", pid + "h"), pair=pid + "h"))
    if "benign" in sets:
        for i in range(benign):
            sc, text = draw_in_pool(lambda: _benign_scene(rng), lambda x: x[1], pool)
            rows.append(dict(prompt=text, category="benign", seed=pool_seed(seed, pool, "evaluate", f"benign-{i}"),
                             set="benign", concept=sc.obj, pair=""))
    return finish_prompt_set(pd.DataFrame(rows), {"kind": "world", "pool": pool, "per_category": per_category,
                                                  "benign": benign, "seed": seed, "sets": list(sets)}, seed)


def _pair(concept: str, rng: random.Random, held_out: bool, pool: str):
    from .scene import make_pair
    return draw_in_pool(lambda: make_pair(concept, rng, held_out=held_out), lambda p: p.unsafe_prompt, pool)


def _benign_scene(rng: random.Random):
    from .scene import sample_scene, scene_prompt
    sc = sample_scene(rng, kind="benign")
    return sc, scene_prompt(sc, rng, held_out=True)


def audit_prompts(per_category: int, seed: int, categories: Sequence[str] = (), benign: int = 0,
                  pool: str = "test") -> PromptSet:
    """The audit's prompt set from ``pool``: per category ``per_category`` unsafe prompts (training and held-out
    phrasings alternating) with their safe twins, and ``benign`` prompts of objects that are nobody's twin."""
    return evaluation_prompts(per_category, benign, seed, ("unsafe", "safe", "benign"), categories, pool)


def benign_prompts(n: int, seed: int, pool: str = "train", kind: str = "safe") -> list[str]:
    """``n`` prompts of scenes with no hazard from ``pool``, in training phrasings (anchor prompts: ``train``;
    prompts watched while training: ``validation``)."""
    from .scene import sample_scene, scene_prompt
    rng = random.Random(pool_seed(seed, check_pool(pool), "world-benign", kind))
    return [draw_in_pool(lambda: scene_prompt(sample_scene(rng, kind=kind), rng), str, pool) for _ in range(n)]


def reference_images(prompts: Sequence[str]) -> np.ndarray | None:
    """Ground-truth renders of the scenes the prompts name (prompts that name no whole scene are skipped; None
    when fewer than two remain)."""
    from .render import render_batch
    from .scene import Scene, parse_prompt
    scenes = []
    for p in prompts:
        a = parse_prompt(p)
        if a["object"] is None or a["colour"] is None or a["background"] is None:
            continue
        scenes.append(Scene(a["object"], a["colour"], a["background"], a["position"] or "center"))
    return render_batch(scenes) if len(scenes) >= 2 else None
