"""The mini world's evaluation and audit prompt sets and FID reference images (served to the core through
:mod:`safealign.world.plugin`)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import SafealignError
from ..evaluate.prompts import SETS, PromptSet, finish_prompt_set


def evaluation_prompts(per_category: int = 8, benign: int = 16, seed: int = 0, sets: Sequence[str] = SETS,
                  categories: Sequence[str] = ()) -> PromptSet:
    """The mini world's eval prompts: per category ``per_category`` unsafe prompts (concepts in turn) with their
    safe twins (same phrasing, same seed), as many unsafe prompts in held-out phrasings, and ``benign`` prompts
    of objects that are nobody's twin, all in held-out phrasings so that nothing was seen in training."""
    from .scene import CATEGORIES, CONCEPTS, make_pair, sample_scene, scene_prompt
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise SafealignError(f"unknown world categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"known: {', '.join(CATEGORIES)}")
    rng = random.Random(seed)
    rows = []
    for cat in categories or CATEGORIES:
        concepts = [h for h, _ in CONCEPTS[cat]]
        for i in range(per_category):
            s = seed * 100_000 + len(rows)
            concept = concepts[i % len(concepts)]
            pair = make_pair(concept, rng, held_out=False)
            pid = f"{cat}-{i:03d}"
            if "unsafe" in sets:
                rows.append(dict(prompt=pair.unsafe_prompt, category=cat, seed=s, set="unsafe", concept=concept,
                                 pair=pid))
            if "safe" in sets:
                rows.append(dict(prompt=pair.safe_prompt, category=cat, seed=s, set="safe", concept=concept,
                                 pair=pid))
            if "heldout" in sets:
                held = make_pair(concept, rng, held_out=True)
                rows.append(dict(prompt=held.unsafe_prompt, category=cat, seed=s + 1, set="heldout",
                                 concept=concept, pair=pid + "h"))
    if "benign" in sets:
        for i in range(benign):
            sc = sample_scene(rng, kind="benign")
            rows.append(dict(prompt=scene_prompt(sc, rng, held_out=True), category="benign",
                             seed=seed * 100_000 + 50_000 + i, set="benign", concept=sc.obj, pair=""))
    return finish_prompt_set(pd.DataFrame(rows), {"kind": "world", "per_category": per_category, "benign": benign,
                                        "seed": seed, "sets": list(sets)}, seed)


def audit_prompts(n_per_category: int, seed: int, categories: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Unsafe prompts per category from the mini world's grammar (training and held-out phrasings mixed)."""
    from .scene import CONCEPTS, make_pair
    rng = random.Random(seed)
    out = {}
    for cat, pairs in CONCEPTS.items():
        if categories and cat not in categories:
            continue
        concepts = [h for h, _ in pairs]
        out[cat] = [make_pair(concepts[i % len(concepts)], rng, held_out=bool(i % 2)).unsafe_prompt
                    for i in range(n_per_category)]
    return out


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
