"""The evaluation protocol: three disjoint pools of prompts and seeds.

- ``train``: what the dataset stage may draw (the experts learn from it);
- ``validation``: every tuning choice and checkpoint selection (``--validate-every``, settings of a recipe);
- ``test``: what a report states as the result.

A prompt's pool is a pure function of its text (:func:`pool_of`: a SHA-256 of the normalised text, 60/20/20), so a
generator that draws from one pool can never produce another pool's prompt, whatever its seed. A seed is drawn
apart per pool and purpose (:func:`pool_seed`), so no evaluation image shares its noise with a training image.
A prompt file a user brings has no pool of its own: a report says ``pool: file`` and names the file.
"""

from __future__ import annotations

import hashlib

from .errors import SafealignError
from .utils import derive_seed

POOLS = ("train", "validation", "test")
#: cumulative shares of the hash space: [0, 0.6) train, [0.6, 0.8) validation, [0.8, 1) test
_BOUNDS = (("train", 0.6), ("validation", 0.8), ("test", 1.0))


def check_pool(pool: str, what: str = "--pool") -> str:
    if pool not in POOLS:
        raise SafealignError(f"{what} must be one of {', '.join(POOLS)}, got {pool!r}")
    return pool


def pool_of(prompt: str) -> str:
    """The pool a prompt belongs to, from its text alone (case and surrounding spaces ignored)."""
    h = hashlib.sha256(" ".join(str(prompt).casefold().split()).encode()).digest()
    u = int.from_bytes(h[:8], "little") / 2 ** 64
    return next(name for name, hi in _BOUNDS if u < hi)


def in_pool(prompt: str, pool: str) -> bool:
    return pool_of(prompt) == pool


def pool_seed(seed: int, pool: str, *keys: int | str) -> int:
    """The sampling seed of one image of ``pool`` (a 63-bit value derived from the run seed, the pool and the
    image's keys): pools and purposes never share a seed."""
    return derive_seed(seed, "pool", check_pool(pool, "pool"), *keys)


__all__ = ["POOLS", "check_pool", "pool_of", "in_pool", "pool_seed"]
