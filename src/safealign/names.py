"""Names that become paths, and paths that must stay inside a folder.

A category, a concept or any other name read from a user's file or flag is a *name*, never a path: before it
becomes a folder or file name it goes through :func:`path_component`, which refuses what a filesystem would read as
anything but one plain entry of the folder (separators, ``.``/``..``, absolute or drive paths, NUL and control
characters, hidden names, names safealign reserves). File names *derived* from free text (chart titles) go through
:func:`slug`, which cannot fail. Paths read from an artifact (a dataset's image paths) go through
:func:`contained`, which follows symlinks and refuses any that lead outside the artifact's folder.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from .errors import SafealignError

#: suffixes safealign gives its own sibling files and folders (a name ending so would collide with them)
RESERVED_SUFFIXES = (".partial", ".lock")
_MAX_BYTES = 200  # below every common filesystem's 255-byte limit, leaving room for suffixes


def path_component(name: object, what: str = "name") -> str:
    """``name`` itself if it is safe as ONE file or folder name; else a one-line :class:`SafealignError`.

    ``what`` says what the name is in the message ("category", "concept", ...).
    """
    s = "" if name is None else str(name)
    problem = _problem(s)
    if problem:
        raise SafealignError(f"{what} {s!r} cannot be used as a file or folder name: {problem}; rename it "
                             "(letters, digits, '-', '_' and spaces are safe)")
    return s


def _problem(s: str) -> str:
    if not s.strip():
        return "it is empty"
    if any(unicodedata.category(ch) == "Cc" for ch in s):
        return "it contains a control character"
    if "/" in s or "\\" in s or (os.altsep and os.altsep in s):
        return "it contains a path separator"
    if re.match(r"^[A-Za-z]:", s):
        return "it looks like a drive path"
    if s.startswith("."):
        return "it starts with '.' (relative or hidden path)"
    if s != s.strip():
        return "it starts or ends with white space"
    if s.endswith(RESERVED_SUFFIXES):
        return f"names ending in {' or '.join(RESERVED_SUFFIXES)} are reserved by safealign"
    if len(s.encode("utf-8")) > _MAX_BYTES:
        return f"it is longer than {_MAX_BYTES} bytes"
    return ""


def is_path_component(name: object) -> bool:
    return name is not None and not _problem(str(name))


def safe_join(root: str | os.PathLike, *names: object, what: str = "name") -> Path:
    """``root / name / ...`` with every name checked by :func:`path_component`."""
    return Path(root).joinpath(*(path_component(n, what) for n in names))


def slug(text: object) -> str:
    """A file name made from free text: letters, digits, '-' and '_' kept, anything else '_' (never empty)."""
    s = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(text))
    return s[:_MAX_BYTES] or "_"


def contained(path: str | os.PathLike, root: str | os.PathLike, what: str = "path") -> Path:
    """``path`` if it resolves (symlinks followed) inside ``root``; else a one-line :class:`SafealignError`.

    Call it on every path an artifact names before reading it: a symlink, or a symlinked folder on the way, that
    leads outside ``root`` is refused.
    """
    r = Path(root).resolve()
    p = Path(path)
    target = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if target != r and r not in target.parents:
        raise SafealignError(f"{what} {p} leads outside {root} (to {target}); an artifact may only read files "
                             "inside its own folder: copy the file in instead of linking it")
    return p
