"""Train/test splits without leakage.

A *leak* is a test prompt (unsafe or safe) whose normalised text (lowercased, Unicode-folded, punctuation and
whitespace collapsed) also occurs among the train prompts: a model evaluated on it has been trained on it. The
official CoProV2 release leaks 728 of its 8,000 test prompts into train; :func:`find_leaks` finds such rows and
:func:`resolve_leaks` moves or drops them.

Splitting by *prompt* groups pairs that share any normalised prompt (union-find) and assigns whole groups, so no
leak can arise; splitting by *concept* holds out whole concepts per category (a counterpart shared by two concepts
can still leak, and is then moved to train).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

import numpy as np
import pandas as pd

from ..errors import SafealignError
from ..utils import derive_seed, logger

SplitBy = Literal["concept", "prompt"]


def normalise_prompt(text: str) -> str:
    """'A  Red knife, on GRAY!' -> 'a red knife on gray' (the key of dedup and leakage checks)."""
    t = unicodedata.normalize("NFKC", str(text)).casefold()
    t = re.sub(r"[\W_]+", " ", t)
    return " ".join(t.split())


def _keys(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    return df["unsafe_prompt"].map(normalise_prompt), df["safe_prompt"].map(normalise_prompt)


def find_leaks(df: pd.DataFrame, train: str = "train", test: str = "test") -> pd.Index:
    """Index labels of ``test`` rows whose unsafe or safe prompt (normalised) also occurs in ``train``."""
    u, s = _keys(df)
    tr = df["split"] == train
    seen = set(u[tr]) | set(s[tr])
    te = df["split"] == test
    leak = te & (u.isin(seen) | s.isin(seen))
    return df.index[leak]


def check_no_leakage(df: pd.DataFrame, where: str = "the dataset") -> None:
    leaks = find_leaks(df)
    if len(leaks):
        ex = df.loc[leaks[0], "unsafe_prompt"]
        raise SafealignError(f"{len(leaks)} test prompt(s) of {where} also occur in train (e.g. {ex!r}); "
                             "re-split, or import with --leakage move|drop")


def resolve_leaks(df: pd.DataFrame, how: Literal["move", "drop", "error"] = "move") -> tuple[pd.DataFrame, int]:
    """Move leaking test rows to train (``move``), remove them (``drop``) or refuse (``error``).

    Returns the new frame and the number of leaking rows. Moving can expose new leaks only through other test
    rows that share the moved prompts, so it iterates until none is left.
    """
    df = df.copy()
    total = 0
    while True:
        leaks = find_leaks(df)
        if not len(leaks):
            return df, total
        total += len(leaks)
        if how == "error":
            check_no_leakage(df)
        if how == "drop":
            df = df.drop(index=leaks)
        else:
            df.loc[leaks, "split"] = "train"


def dedup_pairs(df: pd.DataFrame, key: str = "unsafe_prompt") -> tuple[pd.DataFrame, int]:
    """Keep the first row of each normalised (unsafe, safe) prompt pair; returns (frame, number dropped)."""
    u, s = _keys(df)
    dup = pd.Series(list(zip(u, s)), index=df.index).duplicated()
    return df[~dup], int(dup.sum())


def assign_splits(df: pd.DataFrame, by: SplitBy, test_fraction: float, seed: int = 0) -> pd.DataFrame:
    """A ``split`` column ('train'/'test') per category, leak-free, reproducible from ``seed``."""
    if not 0.0 <= test_fraction < 1.0:
        raise SafealignError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    df = df.copy()
    df["split"] = "train"
    if test_fraction == 0 or df.empty:
        return df
    for cat, sub in df.groupby("category", sort=False):
        rng = np.random.default_rng(derive_seed(seed, "split", cat))
        if by == "concept":
            concepts = list(dict.fromkeys(sub["concept"]))
            if len(concepts) < 2:
                logger.warning("category %s has a single concept; it stays in train (split by concept needs two)",
                               cat)
                continue
            n_test = min(len(concepts) - 1, max(1, int(round(test_fraction * len(concepts)))))
            order = rng.permutation(len(concepts))
            test_concepts = {concepts[i] for i in order[:n_test]}
            df.loc[sub.index[sub["concept"].isin(test_concepts)], "split"] = "test"
        else:
            groups = _prompt_groups(sub)
            order = rng.permutation(len(groups))
            target, n = test_fraction * len(sub), 0
            for gi in order:
                if n + len(groups[gi]) > target + 0.5 or n >= target:
                    continue
                df.loc[groups[gi], "split"] = "test"
                n += len(groups[gi])
    df, moved = resolve_leaks(df, "move")
    if moved:
        logger.info("moved %d test pair(s) whose prompts also occur in train to train", moved)
    return df


def _prompt_groups(sub: pd.DataFrame) -> list[list]:
    """Rows connected by a shared normalised prompt (union-find), in first-appearance order."""
    parent: dict = {i: i for i in sub.index}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, object] = {}
    u, s = _keys(sub)
    for i in sub.index:
        for k in (u[i], s[i]):
            if k in first:
                parent[find(i)] = find(first[k])
            else:
                first[k] = i
    groups: dict = {}
    for i in sub.index:
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())
