"""The paired dataset on disk: ``pairs.parquet`` + ``images/`` + ``safealign.json``.

Columns: pair_id, category, concept, unsafe_prompt, safe_prompt, seed, unsafe_image, safe_image, split.
Image paths are relative to the dataset folder; absolute paths, '..' and symlinks (or a symlinked ``images/``)
that lead outside the folder are refused (a dataset must never make us read outside its folder). Categories are
read in their one spelling (:func:`~.taxonomy.normalise_category`). Everything is validated on open, so a bad
dataset fails before any training starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..artifacts import read_manifest, write_manifest
from ..errors import SafealignError
from ..names import contained
from ..utils import sha256_file
from .imageio import read_image
from .taxonomy import normalise_category

PAIRS_FILE = "pairs.parquet"
COLUMNS = ("pair_id", "category", "concept", "unsafe_prompt", "safe_prompt", "seed", "unsafe_image", "safe_image",
           "split")


def _check_relative(rel: str, folder: Path) -> Path:
    p = PurePosixPath(str(rel).replace("\\", "/"))
    if p.is_absolute() or str(rel).startswith(("/", "\\")) or (len(str(rel)) > 1 and str(rel)[1] == ":"):
        raise SafealignError(f"image path {rel!r} in {folder / PAIRS_FILE} is absolute; paths must be relative "
                             "to the dataset folder")
    if ".." in p.parts:
        raise SafealignError(f"image path {rel!r} in {folder / PAIRS_FILE} contains '..'; paths must stay inside "
                             "the dataset folder")
    return folder / Path(*p.parts)


def _image_path(rel: str, folder: Path) -> Path:
    """The file a relative image path names, refused if it (or a symlinked folder on the way, such as a linked
    ``images/``) leads outside the dataset folder."""
    return contained(_check_relative(rel, folder), folder, f"image {rel!r} of {folder / PAIRS_FILE}")


def read_pairs_table(path: Path, columns: tuple[str, ...] | list[str], empty: str) -> pd.DataFrame:
    """A parquet table of pairs: readable, with ``columns``, not empty, unique pair ids (else one-line errors)."""
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types
        raise SafealignError(f"{path} is not a readable parquet file ({type(e).__name__})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SafealignError(f"{path} lacks column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    if df.empty:
        raise SafealignError(f"{path} has no rows; {empty}")
    if df["pair_id"].duplicated().any():
        dup = df.loc[df["pair_id"].duplicated(), "pair_id"].iloc[0]
        raise SafealignError(f"{path} repeats pair_id {dup!r}; pair ids must be unique")
    from ..validate import check_pair_rows
    return check_pair_rows(df, str(path))  # no null/"nan"/control-character prompts, whole seeds >= 0


def normalised_categories(column: pd.Series, where: str) -> pd.Series:
    """A table's category column in the one spelling (:func:`~.taxonomy.normalise_category`); unsafe or empty
    names are refused with the table named."""
    mapping = {c: normalise_category(c, where) for c in column.drop_duplicates()}
    return column.map(mapping)


@dataclass
class Pair:
    pair_id: str
    category: str
    concept: str
    unsafe_prompt: str
    safe_prompt: str
    seed: int
    unsafe_image: Path
    safe_image: Path
    split: str


class PairedDataset:
    """A validated paired dataset folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SafealignError(f"dataset folder {self.folder} does not exist; create one with "
                                 "`safealign data images` or pass the right --dataset")
        table = self.folder / PAIRS_FILE
        if not table.is_file():
            raise SafealignError(f"dataset folder {self.folder} has no {PAIRS_FILE}; it is empty or not a "
                                 "safealign dataset")
        df = read_pairs_table(table, COLUMNS, "the dataset is empty")
        for col in ("unsafe_image", "safe_image"):
            for rel in df[col]:
                _image_path(rel, self.folder)
        df["category"] = normalised_categories(df["category"], str(table))
        self.table = df.reset_index(drop=True)
        self.manifest = read_manifest(self.folder, "dataset", required=False)

    # -- queries ---------------------------------------------------------------------------------------------
    @property
    def categories(self) -> list[str]:
        return sorted(self.table["category"].unique().tolist())

    def __len__(self) -> int:
        return len(self.table)

    def pairs(self, category: str | None = None, split: str | None = None) -> list[Pair]:
        df = self.table
        if category is not None:
            category = normalise_category(category)
            if category not in set(df["category"]):
                raise SafealignError(f"category {category!r} is not in dataset {self.folder}; it has "
                                     f"{', '.join(self.categories)}")
            df = df[df["category"] == category]
        if split is not None:
            df = df[df["split"] == split]
        return [Pair(str(r.pair_id), str(r.category), str(r.concept), str(r.unsafe_prompt), str(r.safe_prompt),
                     int(r.seed), _image_path(r.unsafe_image, self.folder),
                     _image_path(r.safe_image, self.folder), str(r.split)) for r in df.itertuples()]

    def verify_images(self, pairs: Iterable[Pair]) -> None:
        """Every image exists and decodes (run before training so nothing is written for a bad dataset)."""
        for p in pairs:
            for path in (p.unsafe_image, p.safe_image):
                load_image(path)


def load_image(path: Path, size: int | None = None) -> Image.Image:
    """8-bit RGB (16-bit scaled, alpha over white, size-checked before decoding): :func:`.imageio.read_image`."""
    return read_image(path, size, what=f"image {path} listed in the dataset")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3,H,W) in [-1, 1]."""
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def write_dataset(folder: str | os.PathLike, rows: list[dict], images: dict[str, Image.Image], *,
                  generator: dict | None = None, config: dict | None = None) -> Path:
    """Write a complete dataset folder (``rows`` carry relative image paths that key ``images``).

    Callers wrap this in :func:`safealign.artifacts.atomic_dir`; this function writes into ``folder`` as given.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for rel, im in images.items():
        _check_relative(rel, folder)
        im.save(folder / rel)
    return finalize_dataset(folder, pd.DataFrame(rows), generator=generator, config=config)


CHECKSUMS_FILE = "SHA256SUMS"


def finalize_dataset(folder: str | os.PathLike, df: pd.DataFrame, *, generator: dict | None = None,
                     config: dict | None = None, metrics: dict | None = None, **extra) -> Path:
    """Write ``pairs.parquet``, ``SHA256SUMS`` (``sha256sum -c`` format) and ``safealign.json`` for a folder whose
    images are already in place. ``df`` has :data:`COLUMNS` first; further columns are kept after them."""
    folder = Path(folder)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"dataset rows lack column(s) {', '.join(missing)}")
    df = df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]].reset_index(drop=True)
    lines = []
    for col in ("unsafe_image", "safe_image"):
        for rel in df[col]:
            lines.append(f"{sha256_file(_check_relative(rel, folder))}  {rel}")
    (folder / CHECKSUMS_FILE).write_text("\n".join(sorted(lines, key=lambda ln: ln[66:])) + "\n")
    df.to_parquet(folder / PAIRS_FILE, index=False)
    counts = {"pairs": len(df),
              "per_category": {str(k): int(v) for k, v in df.groupby("category").size().items()},
              "per_split": {str(k): int(v) for k, v in df.groupby("split").size().items()}}
    checksums = {"pairs.parquet": sha256_file(folder / PAIRS_FILE),
                 CHECKSUMS_FILE: sha256_file(folder / CHECKSUMS_FILE), "images": len(lines)}
    write_manifest(folder, "dataset", config=config, base_model=generator, metrics=metrics, counts=counts,
                   checksums=checksums, **extra)
    return folder
