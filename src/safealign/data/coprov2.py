"""Import the official CoProV2 CSVs (AlignGuard's paired data) into a safealign dataset folder.

A CSV row is one image: ``prompt, image, category``. Unsafe images are named ``u_<id>.<ext>`` and their safe twins
``s_<id>.<ext>``: rows ``u_123.png`` and ``s_123.png`` of one CSV form a pair. Categories are normalised
('Harrasment' -> 'harassment'); a pair that carries several ('hate, violence') keeps the first as ``category`` and
all of them in the extra column ``categories``. The split comes from the file name (``*train*.csv``,
``*test*.csv``). The release leaks test prompts into train (728 of 8,000 in the copy we know of): the importer
finds them and moves them to train (default), drops them, or refuses; exact duplicate pairs are removed.
Everything is checked before anything is written.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from pathlib import Path

import pandas as pd

from ..artifacts import atomic_dir, check_output_free
from ..configuration import to_dict
from ..errors import SafealignError
from ..names import contained
from ..utils import derive_seed, logger, progress
from .config import ImportConfig
from .dataset import finalize_dataset
from .splits import dedup_pairs, resolve_leaks
from .taxonomy import normalise_category

_NAME = re.compile(r"^([us])_(.+)\.(png|jpe?g|webp|bmp)$", re.I)


def _csv_files(cfg: ImportConfig) -> list[tuple[Path, str]]:
    src = Path(cfg.source)
    if src.is_file():
        split = cfg.split or _split_of(src)
        if not split:
            raise SafealignError(f"cannot tell the split of {src.name} from its name; pass --split train|test")
        return [(src, split)]
    if not src.is_dir():
        raise SafealignError(f"--source {src} does not exist; pass a CoProV2 CSV or the folder holding them")
    files = sorted(src.glob("*.csv"))
    if not files:
        raise SafealignError(f"{src} holds no .csv file; pass the folder of the CoProV2 CSVs")
    out = []
    for f in files:
        split = _split_of(f)
        if not split:
            raise SafealignError(f"cannot tell the split of {f.name} (its name has neither 'train' nor 'test'); "
                                 "import it alone with --source FILE --split NAME")
        out.append((f, split))
    return out


def _split_of(p: Path) -> str:
    n = p.stem.lower()
    return "train" if "train" in n else "test" if "test" in n else ""


def read_coprov2_csv(path: Path) -> pd.DataFrame:
    """Rows of one CSV with columns prompt, image, category (validated; UTF-8 required)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SafealignError(f"{path} is not UTF-8 (invalid byte at offset {e.start}); convert it, e.g. "
                             f"iconv -f latin1 -t utf-8") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise SafealignError(f"{path} has no rows")
    cols = {(k or "").strip().lower(): k for k in rows[0]}
    missing = [c for c in ("prompt", "image", "category") if c not in cols]
    if missing:
        raise SafealignError(f"{path} lacks column(s) {', '.join(missing)}; CoProV2 CSVs have prompt, image, "
                             "category")
    df = pd.DataFrame({c: [(r.get(cols[c]) or "").strip() for r in rows] for c in ("prompt", "image", "category")})
    dup = df["image"].duplicated()
    if dup.any():
        raise SafealignError(f"{path} names image {df.loc[dup, 'image'].iloc[0]!r} twice; image ids must be unique")
    return df


def _find_image(name: str, csv_path: Path, images_dir: str) -> Path | None:
    """The image a CSV row names, looked up under ``--images`` and beside the CSV; one that is (or, through a
    symlink, leads) outside the folder it was found in is refused, so a link to a system file is never copied."""
    base = csv_path.parent
    cands = [(Path(images_dir), Path(images_dir) / name)] if images_dir else []
    cands += [(base, base / name), (base, base / "images" / name), (base, base / csv_path.stem / name),
              (base, base / "images" / Path(name).name)]
    for root, c in cands:
        if c.is_file():
            return contained(c, root, f"image {name!r} of {csv_path.name}")
    return None


def pairs_from_csv(path: Path, split: str, images_dir: str) -> tuple[pd.DataFrame, dict]:
    df = read_coprov2_csv(path)
    unsafe, safe, other = {}, {}, 0
    for r in df.itertuples():
        m = _NAME.match(Path(r.image).name)
        if not m:
            other += 1
            continue
        (unsafe if m.group(1).lower() == "u" else safe)[m.group(2)] = r
    ids = [i for i in unsafe if i in safe]
    unpaired = len(unsafe) + len(safe) - 2 * len(ids)
    rows, missing = [], []
    for i in ids:
        u, s = unsafe[i], safe[i]
        paths = []
        for r in (u, s):
            p = _find_image(r.image, path, images_dir)
            if p is None:
                missing.append(r.image)
            paths.append(p)
        cats = [normalise_category(c, str(path)) for c in re.split(r"[,;|]", u.category or s.category)
                if c.strip()]
        if not cats:
            raise SafealignError(f"{path}: image {u.image!r} has no category")
        if not u.prompt or not s.prompt:
            raise SafealignError(f"{path}: pair {i!r} has an empty prompt")
        pid = f"coprov2-{split}-{re.sub(r'[^A-Za-z0-9._-]', '-', i)}"
        # the release records no seed: a fixed one per pair (seeds are >= 0), for anything that samples per pair
        rows.append(dict(pair_id=pid, category=cats[0], concept=cats[0], unsafe_prompt=u.prompt,
                         safe_prompt=s.prompt, seed=derive_seed(0, "coprov2", pid) % 2**31, split=split,
                         categories=",".join(cats), source_unsafe=str(paths[0]), source_safe=str(paths[1])))
    if missing:
        raise SafealignError(f"{len(missing)} image(s) named in {path} are missing (e.g. {missing[0]!r}); pass the "
                             "folder holding them with --images")
    return pd.DataFrame(rows), {"rows": len(df), "pairs": len(rows), "unpaired_rows": unpaired,
                                "rows_without_u_s_name": other}


def import_coprov2(cfg: ImportConfig) -> tuple[Path, dict]:
    """Check everything, then write the dataset folder atomically. Returns (folder, stats)."""
    final = check_output_free(cfg.output, cfg.overwrite)
    frames, per_file = [], {}
    for f, split in _csv_files(cfg):
        d, st = pairs_from_csv(f, split, cfg.images)
        frames.append(d)
        per_file[f.name] = {"split": split, **st}
        if st["unpaired_rows"]:
            logger.warning("%s: %d row(s) without their u_/s_ twin were skipped", f.name, st["unpaired_rows"])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if df.empty:
        raise SafealignError(f"no u_/s_ image pair found in {cfg.source}; is it a CoProV2 CSV?")
    if df["pair_id"].duplicated().any():
        raise SafealignError(f"pair id {df.loc[df['pair_id'].duplicated(), 'pair_id'].iloc[0]!r} occurs in two "
                             "CSVs of the same split; import them separately")
    n_before = len(df)
    deduped = [dedup_pairs(df[df["split"] == s]) for s in dict.fromkeys(df["split"])]
    df = pd.concat([d for d, _ in deduped])
    df, leaks = resolve_leaks(df, cfg.leakage)
    df, n_dup = dedup_pairs(df)  # a moved test pair may repeat a train pair exactly
    stats = {"files": per_file, "pairs_in_csvs": n_before, "duplicates_removed": sum(k for _, k in deduped) + n_dup,
             "test_prompts_leaking_into_train": leaks, "leakage_action": cfg.leakage}
    if leaks:
        logger.warning("%d test pair(s) share a prompt with train; %s", leaks,
                       "moved to train" if cfg.leakage == "move" else "dropped")
    df = df.reset_index(drop=True)
    with atomic_dir(final, cfg.overwrite) as w:
        (w / "images").mkdir()
        us, ss = [], []
        for r in progress(df.itertuples(), total=len(df), desc="images"):
            for src, side, out in ((r.source_unsafe, "u", us), (r.source_safe, "s", ss)):
                rel = f"images/{r.pair_id}_{side}{Path(src).suffix.lower()}"
                _place(Path(src), w / rel, cfg.link)
                out.append(rel)
        df["unsafe_image"], df["safe_image"] = us, ss
        df = df.drop(columns=["source_unsafe", "source_safe"])
        finalize_dataset(w, df, generator={"source": "CoProV2 (official CSVs)", "note": "images as released"},
                         config=to_dict(cfg), metrics={"import": stats})
    stats["pairs"] = len(df)
    stats["per_category"] = {k: int(v) for k, v in df.groupby("category").size().items()}
    stats["per_split"] = {k: int(v) for k, v in df.groupby("split").size().items()}
    return final, stats


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)
