"""Checks of single values every reader shares: prompts and seeds.

A prompt is text a tokenizer reads: a missing table cell (None, NaN) must not become the word "nan", and NUL or
other control characters (a damaged file, a binary column) must not reach a text encoder. A seed is a whole
number in [0, 2**63): NaN, fractions, booleans and negative numbers are refused, not truncated or wrapped.
Each check raises :class:`~safealign.errors.SafealignError` with one line naming ``what`` (e.g. "pairs.parquet
row 12 unsafe_prompt").
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import SafealignError

#: the largest seed + 1 (torch.Generator.manual_seed and numpy take 64-bit seeds; keep clear of the sign bit)
SEED_LIMIT = 2 ** 63
_ALLOWED_CONTROL = "\t"


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA/NaT: a cell with no value."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    try:
        import pandas as pd
        return bool(pd.isna(value)) if not isinstance(value, (str, bytes, list, tuple, dict)) else False
    except (TypeError, ValueError, ImportError):
        return False


def check_prompt(value: Any, what: str = "prompt", *, allow_empty: bool = False) -> str:
    """``value`` as a prompt: a str without control characters (tab allowed); empty only if ``allow_empty``."""
    if is_missing(value):
        raise SafealignError(f"{what} is missing (null/NaN); fill it in or drop the row")
    if not isinstance(value, str):
        raise SafealignError(f"{what} must be text, got {type(value).__name__} {value!r:.40}")
    bad = next((ch for ch in value if (ord(ch) < 32 and ch not in _ALLOWED_CONTROL) or 127 <= ord(ch) < 160),
               None)
    if bad is not None:
        raise SafealignError(f"{what} contains the control character {bad!r} at position {value.index(bad)}; "
                             "remove it (a damaged or binary file?)")
    if not allow_empty and not value.strip():
        raise SafealignError(f"{what} is empty; write a prompt or drop the row")
    return value


def check_seed(value: Any, what: str = "seed") -> int:
    """``value`` as a seed: a whole number in [0, 2**63); 7.0 is accepted as 7, 7.5, NaN, True and -1 are not."""
    if isinstance(value, bool) or is_missing(value):
        raise SafealignError(f"{what} must be a whole number >= 0, got {value!r}")
    if isinstance(value, numbers.Integral):
        seed = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        seed = int(value)
    else:
        raise SafealignError(f"{what} must be a whole number >= 0, got {value!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise SafealignError(f"{what} must be in [0, 2**63), got {seed}")
    return seed


def check_pair_rows(df, where: str, prompt_columns: tuple[str, ...] = ("unsafe_prompt", "safe_prompt")):
    """A pairs table's prompt columns (each cell a prompt) and ``seed`` column (each a seed, stored as int64), with
    errors naming the table, the row and the pair; returns ``df``."""
    ids = df["pair_id"].tolist() if "pair_id" in df.columns else [None] * len(df)

    def label(i: int, col: str) -> str:
        pid = f" (pair {ids[i]!r:.40})" if ids[i] is not None else ""
        return f"{where}: row {i + 1}{pid} {col}"
    for col in (c for c in prompt_columns if c in df.columns):
        for i, v in enumerate(df[col].tolist()):
            check_prompt(v, label(i, col))
    if "seed" in df.columns:
        df["seed"] = [check_seed(v, label(i, "seed")) for i, v in enumerate(df["seed"].tolist())]
        df["seed"] = df["seed"].astype("int64")
    return df
