"""Small shared helpers: logging, the one progress-bar helper, seeding, hashing."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
logger = logging.getLogger("safealign")

_PROGRESS_ENABLED = os.environ.get("SAFEALIGN_NO_PROGRESS", "") in ("", "0")


def set_progress(enabled: bool) -> None:
    """Turn every safealign progress bar on or off (also: env SAFEALIGN_NO_PROGRESS=1)."""
    global _PROGRESS_ENABLED
    _PROGRESS_ENABLED = enabled


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             disable: bool | None = None, **kw) -> tqdm[T]:
    """The one progress bar of the package (tqdm to stderr, off when disabled or not a TTY in CI)."""
    if disable is None:
        disable = not _PROGRESS_ENABLED
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True,
                file=sys.stderr, leave=False, **kw)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at emit time (not the stream captured at set-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if not logger.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
    logger.setLevel(level)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts; the same parts always give the same seed (used per step and rank)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
