"""Artifact folders: atomic writes, the self-describing `safealign.json`, clear errors on load.

Every stage writes into ``<final>.partial`` (or a fresh temp folder) and renames it into place only when the
artifact is whole, so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import glob
import json
import os
import re
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


# -- writing safely: what an output may replace, one writer per output, filesystem errors in one line ------------

_ADVICE = {errno.ENOSPC: "free disk space or choose another --output",
           getattr(errno, "EDQUOT", errno.ENOSPC): "free disk space or choose another --output",
           errno.EFBIG: "the file is larger than this filesystem allows; choose another --output",
           errno.EROFS: "the filesystem is read-only; choose another --output",
           errno.EACCES: "choose a folder you may write to, or fix its permissions",
           errno.EPERM: "choose a folder you may write to, or fix its permissions",
           errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --output",
           errno.EISDIR: "it is a folder; choose a file name",
           errno.EEXIST: "remove it or choose another --output",
           errno.ENOTEMPTY: "remove it or choose another --output",
           errno.ENOENT: "check that the path exists",
           errno.ENAMETOOLONG: "choose a shorter path"}


def describe_os_error(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for a filesystem error: 'cannot write <path>: <reason>; <what to do>'."""
    where = e.filename if e.filename is not None else path
    verb = "cannot access" if e.errno == errno.ENOENT else "cannot write"
    reason = e.strerror or str(e) or type(e).__name__
    return (f"{verb}{f' {where}' if where is not None else ''}: {reason}; "
            f"{_ADVICE.get(e.errno or 0, 'check the path and the disk, then retry')}")


def written_by_safealign(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is an artifact safealign wrote: it holds a ``safealign.json`` of a known kind, or it is
    a non-empty folder of such artifacts only (the world's ``pipeline/`` + ``judge/``)."""
    def own(d: Path) -> bool:
        try:
            m = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(m, dict) and m.get("kind") in KINDS

    f = Path(folder)
    if own(f):
        return True
    entries = [e for e in f.iterdir() if not e.name.startswith(".")] if f.is_dir() else []
    return bool(entries) and all(e.is_dir() and not e.is_symlink() and own(e) for e in entries)


def _check_parents(p: Path) -> None:
    for anc in p.parents:
        if anc.exists():
            if not anc.is_dir():
                raise SafealignError(f"cannot write {p}: {anc} is a file, not a folder; choose another --output")
            return


def check_output_free(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``, and with ``overwrite`` any folder safealign did not
    write; take the output's writer lock (:func:`lock_output`). Return the path."""
    p = Path(path)
    _check_parents(p)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise SafealignError(f"output folder {p} already exists; choose another --output or pass --overwrite")
        if p.is_symlink() or not p.is_dir():
            raise SafealignError(f"output {p} exists and is not a folder; remove it or choose another --output")
        if any(p.iterdir()) and not written_by_safealign(p):
            raise SafealignError(f"--overwrite replaces only a folder safealign wrote, and {p} holds no "
                                 f"{MANIFEST}; remove it yourself or choose another --output")
    lock_output(p)
    return p


def check_file_free(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output file unless ``overwrite``, and a folder in its place always. Return the path."""
    p = Path(path)
    _check_parents(p)
    if p.is_dir():
        raise SafealignError(f"{p} is a folder; pass a file name")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise SafealignError(f"{p} already exists; choose another file or pass --overwrite")
    return p


# -- one writer per output: a lock file beside it ----------------------------------------------------------------

_HELD: dict[str, Any] = {}  # lock files this process holds -> their FileLock
_CREATED: dict[str, list[Path]] = {}  # lock file -> the folders taking it created (removed again when empty)


def _lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def _secondary_process() -> bool:
    """A non-main process of a distributed launch (``RANK`` > 0): the main process holds the locks."""
    return os.environ.get("RANK", "0").strip() not in ("", "0")


def lock_output(path: str | os.PathLike) -> None:
    """Take the writer lock of output ``path`` (the file ``.<name>.lock`` beside it) for this process; a second
    process that asks for it refuses at once with one line naming the holder's pid. Held until
    :func:`release_output` (``atomic_dir`` calls it when the artifact is in place) or the process ends; taking a
    lock this process already holds does nothing."""
    if _secondary_process():
        return
    p = Path(path)
    created = [d for d in [p.parent, *p.parent.parents] if not d.exists()]
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SafealignError(describe_os_error(e, p)) from None
    lf = _lock_path(p)
    key = str(lf.parent.resolve() / lf.name)
    if key in _HELD:
        return
    _CREATED[key] = created
    from filelock import FileLock, Timeout
    lock = FileLock(key, timeout=0)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = _holder_pid(lf)
        raise SafealignError(f"{p} is being written by another safealign process{f' (pid {pid})' if pid else ''}; "
                             "wait for it to finish or choose another --output") from None
    except OSError as e:
        raise SafealignError(describe_os_error(e, p)) from None
    _HELD[key] = lock
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if re.fullmatch(r"\d*\s*", lf.read_text()):  # empty, or a pid (ours, or a killed holder's): record who
            lf.write_text(f"{os.getpid()}\n")         # holds it (other content is filelock's own soft marker)


def _holder_pid(lf: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(lf.read_text().split()[0])
    return None


def release_output(path: str | os.PathLike) -> None:
    """Release this process's lock on output ``path`` (and remove the lock file); nothing if not held."""
    lf = _lock_path(Path(path))
    with contextlib.suppress(OSError):
        _release(str(lf.parent.resolve() / lf.name))


def _release(key: str) -> None:
    lock = _HELD.pop(key, None)
    if lock is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(key)  # while still held: a process that opened the old file sees it unlinked and retries
    lock.release()
    for d in _CREATED.pop(key, []):  # deepest first: a failed command leaves no empty folder behind
        with contextlib.suppress(OSError):
            d.rmdir()


def release_all_outputs() -> None:
    """Release every output lock this process holds (the CLI calls it when a command ends, however it ends)."""
    for key in list(_HELD):
        with contextlib.suppress(OSError):
            _release(key)


# -- atomic writes -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False, work: str | os.PathLike | None = None
               ) -> Iterator[Path]:
    """Yield a work folder; on success it replaces ``final`` atomically, on error it is removed.

    ``work``: a persistent work folder (e.g. ``<final>.partial`` holding resumable checkpoints) which is kept on
    error instead of being deleted. The output's writer lock is held throughout and released at the end.
    """
    final = check_output_free(final, overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{glob.escape(final.name)}.*"):  # left by a killed earlier attempt (we
            if stale.is_dir():                                              # hold the lock: no live writer's)
                shutil.rmtree(stale, ignore_errors=True)
        keep_on_error = work is not None
        tmp = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            yield tmp
            _commit(tmp, final)
        except BaseException:
            if not keep_on_error:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        release_output(final)


def _commit(tmp: Path, final: Path) -> None:
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)  # the previous artifact back in place
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (refused if it exists, unless
    ``overwrite``), on any error it is removed."""
    p = check_file_free(path, overwrite)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path, overwrite=True) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


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
