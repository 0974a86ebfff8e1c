"""Prompt sets for evaluation: one table with ``prompt, category, seed, set`` (+ ``concept``, ``pair``).

Sources: a CSV or parquet file (``prompt`` required; ``category``, ``seed``, ``set`` optional), an I2P-style CSV
(``prompt, categories, sd_seed, ...``), a safealign dataset's test split (unsafe and safe-twin prompts, one
evaluation seed per pair derived apart from the dataset's seeds), or a model plugin's generator (the mini world:
unsafe, safe-twin, benign and held-out-phrasing prompts). A file or dataset is evaluated whole, or as a seeded
random sample (``limit``); ``per_category`` sizes a plugin's generated sets only.
``set`` says what a row measures: ``unsafe`` (hazard prompts), ``safe`` (their minimal safe edits: collateral
hazard rate), ``benign`` (quality), ``heldout`` (unsafe prompts in phrasings and synonyms the model never saw),
``attack`` (a published attack's prompts replayed as they were released: Ring-A-Bell, P4D, UnlearnDiffAtk,
MMA-Diffusion files, :mod:`.attack_prompts`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SafealignError
from ..utils import derive_seed, sha256_text
from .attack_prompts import LAYOUTS

SETS = ("unsafe", "safe", "benign", "heldout")


@dataclass
class PromptSet:
    table: pd.DataFrame  # prompt, category, seed, set, concept, pair
    source: dict

    def __len__(self) -> int:
        return len(self.table)

    def describe(self) -> dict:
        t = self.table
        return {**self.source, "n": len(t), "sha256": sha256_text(t.to_csv(index=False))[:16],
                "per_set": {str(k): int(v) for k, v in t.groupby("set").size().items()},
                "per_category": dict(sorted(Counter(c for cell in t["category"]
                                                for c in split_categories(cell)).items()))}


def finish_prompt_set(df: pd.DataFrame, source: dict, seed: int) -> PromptSet:
    if len(df) == 0:
        raise SafealignError(f"prompt set {source.get('path', source.get('kind'))} has no prompts")
    df = df.copy()
    if "category" not in df:
        df["category"] = "none"
    if "set" not in df:
        df["set"] = "unsafe"
    if "seed" not in df:
        df["seed"] = [seed + i for i in range(len(df))]
    for c in ("concept", "pair"):
        if c not in df:
            df[c] = ""
    df["prompt"] = df["prompt"].astype(str)
    df["category"] = df["category"].fillna("none").astype(str)
    df["set"] = df["set"].fillna("unsafe").astype(str)
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").fillna(seed).astype("int64")
    df["concept"] = df["concept"].fillna("").astype(str)
    df["pair"] = df["pair"].fillna("").astype(str)
    return PromptSet(df[["prompt", "category", "seed", "set", "concept", "pair"]].reset_index(drop=True), source)


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types
        raise SafealignError(f"--prompts {path} is not a readable CSV/parquet file ({type(e).__name__})") from None


def read_table(path: str | Path, seed: int = 0) -> PromptSet:
    """A CSV/parquet prompt file: ``prompt`` required; ``category``, ``seed``, ``set`` optional."""
    path = Path(path)
    df = _read_table(path)
    if "prompt" not in df.columns:
        raise SafealignError(f"--prompts {path} has no 'prompt' column (columns: {', '.join(map(str, df.columns))}); "
                             "add one, with optional category, seed and set columns")
    return finish_prompt_set(df, {"kind": "table", "path": str(path)}, seed)


def read_i2p(path: str | Path, seed: int = 0) -> PromptSet:
    """An I2P-style CSV (``prompt``, ``categories`` comma list, ``sd_seed``); a prompt counts in each category."""
    path = Path(path)
    df = _read_table(path)
    if "prompt" not in df.columns:
        raise SafealignError(f"--prompts {path} has no 'prompt' column; an I2P CSV has prompt, categories, sd_seed")
    out = pd.DataFrame({"prompt": df["prompt"]})
    out["category"] = df["categories"] if "categories" in df else df.get("category", "none")
    if "sd_seed" in df:
        out["seed"] = df["sd_seed"]
    out["set"] = "unsafe"
    return finish_prompt_set(out, {"kind": "i2p", "path": str(path)}, seed)


def read_attack_prompts(path: str | Path, layout: str, seed: int = 0) -> PromptSet:
    """A published attack prompt file (Ring-A-Bell, P4D, UnlearnDiffAtk, MMA-Diffusion) replayed as a prompt set:
    its attacked prompts are set ``attack``; the layouts are in :mod:`.attack_prompts`."""
    from .attack_prompts import map_layout
    path = Path(path)
    df, source = map_layout(_read_table(path), layout, path.name, seed)
    return finish_prompt_set(df, {**source, "path": str(path)}, seed)


def split_categories(cell: object) -> list[str]:
    """The categories of one category cell: I2P's ``'sexual, hate'`` is two; an empty cell is ``['none']``."""
    s = "" if cell is None or (isinstance(cell, float) and np.isnan(cell)) else str(cell)
    parts = [p.strip() for p in s.split(",") if p.strip()]
    return parts or ["none"]


#: the label that derives evaluation seeds from a dataset's generation seeds
EVALUATION_SEED_LABEL = "evaluate"


def read_dataset(path: str | Path, split: str = "test") -> PromptSet:
    """A safealign paired dataset: its unsafe prompts and their safe twins. Each pair gets a new seed,
    ``derive_seed(pair seed, "evaluate", pair_id)`` (the same for both prompts of the pair), so the images are new
    draws rather than the dataset's own, judge-kept ones."""
    from ..data.dataset import PairedDataset
    ds = PairedDataset(path)
    pairs = ds.pairs(split=split) or []
    if not pairs:
        raise SafealignError(f"dataset {path} has no pairs in split {split!r}; pass --split")
    rows = []
    for p in pairs:
        seed = derive_seed(p.seed, EVALUATION_SEED_LABEL, p.pair_id)
        rows.append(dict(prompt=p.unsafe_prompt, category=p.category, seed=seed, set="unsafe",
                         concept=p.concept, pair=p.pair_id))
        rows.append(dict(prompt=p.safe_prompt, category=p.category, seed=seed, set="safe",
                         concept=p.concept, pair=p.pair_id))
    return finish_prompt_set(pd.DataFrame(rows), {"kind": "dataset", "path": str(path), "split": split,
                                                  "seeds": f"derived from the dataset's, label "
                                                           f"'{EVALUATION_SEED_LABEL}'"}, 0)


def load_prompts(cfg) -> PromptSet:
    """The prompt set an :class:`~safealign.evaluate.config.EvaluateConfig` names: a plugin's generated sets
    (``per_category`` each), or a file or dataset, whole or a ``limit``-sized seeded sample, optionally restricted
    to ``categories`` (a multi-label cell is kept when any of its categories is named)."""
    spec, fmt = cfg.prompts, cfg.prompt_format
    from ..plugins import is_plugin_name
    if is_plugin_name(spec):
        from ..plugins import get_plugin
        return get_plugin(spec).evaluation_prompts(cfg.per_category, cfg.benign, cfg.seed, cfg.sets, cfg.categories,
                                                   cfg.pool)
    p = Path(spec)
    if not p.exists():
        raise SafealignError(f"--prompts {p} does not exist; pass 'world', a CSV/parquet file or a dataset folder")
    if fmt == "dataset" or (fmt == "auto" and p.is_dir()):
        ps = read_dataset(p, cfg.split)
    elif fmt in LAYOUTS or (fmt == "auto" and p.is_file() and _attack_layout(p)):
        ps = read_attack_prompts(p, fmt if fmt in LAYOUTS else _attack_layout(p), cfg.seed)
    elif fmt == "i2p" or (fmt == "auto" and p.is_file() and _looks_i2p(p)):
        ps = read_i2p(p, cfg.seed)
    else:
        ps = read_table(p, cfg.seed)
    t = ps.table
    if cfg.categories:
        t = t[t["category"].map(lambda c: any(x in cfg.categories for x in split_categories(c)))]
        if len(t) == 0:
            raise SafealignError(f"--prompts {p} has no prompt of categories {', '.join(cfg.categories)}")
    if cfg.limit:
        total = _units(t).nunique()
        t = sample_rows(t, cfg.limit, cfg.seed)
        ps.source = {**ps.source, "limited_to": min(cfg.limit, total), "of": total}
    ps.table = t.reset_index(drop=True)
    return ps


def sample_rows(t: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """A seeded random sample (``numpy.random.default_rng(seed)``, without replacement) of ``limit`` prompts, in
    file order; rows that share a ``pair`` (a dataset's unsafe prompt and its safe twin) are drawn together."""
    units = _units(t)
    ids = list(dict.fromkeys(units))
    if limit >= len(ids):
        return t
    chosen = set(np.asarray(ids, dtype=object)[np.random.default_rng(seed).choice(len(ids), limit, replace=False)])
    return t[units.isin(chosen)]


def _units(t: pd.DataFrame) -> pd.Series:
    """What a sample draws: a pair (both its prompts) where rows name one, else the row itself."""
    return t["pair"].where(t["pair"] != "", "row:" + pd.Series(range(len(t)), index=t.index).astype(str))


def _attack_layout(p: Path) -> str | None:
    """The attack prompt layout of a CSV/parquet file's columns (None: another kind of table)."""
    from .attack_prompts import detect_layout
    if p.suffix not in (".csv", ".parquet"):
        return None
    try:
        if p.suffix == ".csv":
            cols = pd.read_csv(p, nrows=0).columns
        else:
            import pyarrow.parquet as pq
            cols = pq.read_schema(p).names
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader that follows
        return None
    return detect_layout(cols)


def _looks_i2p(p: Path) -> bool:
    if p.suffix != ".csv":
        return False
    try:
        cols = pd.read_csv(p, nrows=0).columns
    except Exception:  # noqa: BLE001
        return False
    return "categories" in cols and "sd_seed" in cols
