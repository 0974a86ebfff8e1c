"""Where the shipped world lives: ``weights/pipeline`` (``StableDiffusionPipeline.from_pretrained`` loads it) and
``weights/judge``, the build record of a world pipeline, and the sha256 checksums of its weight files.

``weights/checksums.json`` (written by ``world build``) holds the sha256 of every ``.safetensors`` file under the
world folder; :func:`pipeline_path` and :func:`judge_path` check the files they hand out against it (once per file
and process), so a flipped bit fails with one line instead of giving black images with exit code 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SafealignError

WEIGHTS = Path(__file__).resolve().parent / "weights"
CHECKSUMS = "checksums.json"
#: files already verified in this process: (path, size, mtime_ns) -> sha256
_VERIFIED: dict[tuple[str, int, int], str] = {}


def weight_files(world_dir: str | os.PathLike, part: str = "") -> list[str]:
    """The weight files of a world folder (or of its ``part``, e.g. ``pipeline``), relative, sorted."""
    root = Path(world_dir)
    return sorted(p.relative_to(root).as_posix() for p in (root / part).rglob("*.safetensors") if p.is_file())


def write_checksums(world_dir: str | os.PathLike) -> dict[str, str]:
    """Record the sha256 of every weight file of a world folder in its ``checksums.json``; returns them."""
    from ..utils import sha256_file
    root = Path(world_dir)
    sums = {rel: sha256_file(root / rel) for rel in weight_files(root)}
    (root / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": sums}, indent=2, sort_keys=True) + "\n")
    return sums


def _recorded(root: Path) -> dict[str, str] | None:
    f = root / CHECKSUMS
    if not f.is_file():
        return None
    try:
        files = json.loads(f.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise SafealignError(f"{f} is damaged; reinstall safealign or run `safealign world build`") from None
    if not isinstance(files, dict):
        raise SafealignError(f"{f} is damaged; reinstall safealign or run `safealign world build`")
    return files


def verify_checksums(world_dir: str | os.PathLike, part: str = "", *, required: bool = False) -> None:
    """Check the weight files of ``world_dir/part`` against ``world_dir/checksums.json``: a changed, missing or
    unrecorded file is a one-line error. No checksums file: an error if ``required``, else nothing to check."""
    from ..utils import sha256_file
    root = Path(world_dir)
    sums = _recorded(root)
    if sums is None:
        if required:
            raise SafealignError(f"{root / CHECKSUMS} is missing, so the world's weights cannot be verified; "
                                 "reinstall safealign or run `safealign world build`")
        return
    prefix = f"{part.strip('/')}/" if part else ""
    expected = {rel: h for rel, h in sums.items() if rel.startswith(prefix)}
    present = weight_files(root, part)
    for rel in sorted(set(expected) | set(present)):
        f = root / rel
        if rel not in expected or not f.is_file():
            what = "is not recorded in" if rel not in expected else "is missing but recorded in"
            raise SafealignError(f"world weight file {f} {what} {root / CHECKSUMS}; reinstall safealign or run "
                                 "`safealign world build`")
        st = f.stat()
        key = (str(f), st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            _VERIFIED[key] = sha256_file(f)
        if _VERIFIED[key] != expected[rel]:
            raise SafealignError(f"world weight file {f} does not match its sha256 in {root / CHECKSUMS} (damaged "
                                 "or modified); reinstall safealign or run `safealign world build`")


def pipeline_path() -> Path:
    """The shipped world pipeline folder (error if the weights are not built or fail their checksums)."""
    p = WEIGHTS / "pipeline"
    if not (p / "model_index.json").is_file():
        raise SafealignError("the mini world's weights are not built; run `safealign world build`")
    verify_checksums(WEIGHTS, "pipeline", required=True)
    return p


def judge_path() -> Path:
    """The shipped world judge folder (error if not built or if it fails its checksums)."""
    p = WEIGHTS / "judge"
    if not (p / "judge.safetensors").is_file():
        raise SafealignError("the mini world's judge is not built; run `safealign world build`")
    verify_checksums(WEIGHTS, "judge", required=True)
    return p


def manifest(path=None) -> dict:
    """The ``safealign.json`` of a world pipeline (the shipped one by default): build config, timings, metrics."""
    from ..artifacts import read_manifest
    return read_manifest(Path(path) if path is not None else pipeline_path(), kind="world")
