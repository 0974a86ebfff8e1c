"""Artifact folders: atomic writes, the self-describing `safealign.json`, clear errors on load.

Every stage writes into ``<final>.partial`` (or a fresh temp folder) and renames it into place only when the
artifact is whole, so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import SafealignError

MANIFEST = "safealign.json"
KINDS = ("dataset", "lora", "report", "world", "pipeline", "judge")


def git_hash() -> str | None:
    """The git commit of the safealign checkout, if it is one (provenance only)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_output_free(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; return the path."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise SafealignError(f"output folder {p} already exists; choose another --output or pass --overwrite")
    if p.exists() and not p.is_dir():
        raise SafealignError(f"output {p} exists and is not a folder; remove it or choose another --output")
    return p


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False, work: str | os.PathLike | None = None
               ) -> Iterator[Path]:
    """Yield a work folder; on success it replaces ``final`` atomically, on error it is removed.

    ``work``: a persistent work folder (e.g. ``<final>.partial`` holding resumable checkpoints) which is kept on
    error instead of being deleted.
    """
    final = check_output_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*"):  # left by a killed earlier attempt
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    keep_on_error = work is not None
    tmp = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_manifest(folder: str | os.PathLike, kind: str, *, config: dict | None = None,
                   base_model: dict | None = None, metrics: dict | None = None, **extra: Any) -> dict:
    """Write ``safealign.json`` describing the artifact: kind, versions, git hash, base model, config, metrics."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    import diffusers
    import peft
    import torch
    import transformers

    manifest = {
        "kind": kind,
        "safealign_version": __version__,
        "git_hash": git_hash(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "base_model": base_model,
        **extra,
        "config": config,
        "metrics": metrics or {},
    }
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike, kind: str | None = None, required: bool = True) -> dict | None:
    """Read ``safealign.json``; unknown keys from newer versions are kept, a wrong kind is an error."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        if required:
            raise SafealignError(f"{folder} is not a safealign artifact (no {MANIFEST}); pass the folder a "
                                 "safealign command wrote")
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SafealignError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}); the artifact is damaged") from None
    if kind is not None and m.get("kind") != kind:
        raise SafealignError(f"{folder} is a {m.get('kind')!r} artifact, expected {kind!r}")
    return m
