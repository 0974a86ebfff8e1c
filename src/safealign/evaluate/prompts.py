"""Prompt sets for evaluation: one table with ``prompt, category, seed, set`` (+ ``concept``, ``pair``).

Sources: a CSV or parquet file (``prompt`` required; ``category``, ``seed``, ``set`` optional), an I2P-style CSV
(``prompt, categories, sd_seed, ...``), a safealign dataset's test split (unsafe and safe-twin prompts, same seed),
or, for the mini world, a built-in generator of unsafe, safe-twin, benign and held-out-phrasing prompts.
``set`` says what a row measures: ``unsafe`` (hazard prompts), ``safe`` (their minimal safe edits: collateral
hazard rate), ``benign`` (quality), ``heldout`` (unsafe prompts in phrasings and synonyms the model never saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import SafealignError
from ..utils import sha256_text

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
                "per_category": {str(k): int(v) for k, v in t.groupby("category").size().items()}}


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


def read_dataset(path: str | Path, split: str = "test") -> PromptSet:
    """A safealign paired dataset: its unsafe prompts and their safe twins, each pair with its recorded seed."""
    from ..data.dataset import PairedDataset
    ds = PairedDataset(path)
    pairs = ds.pairs(split=split) or []
    if not pairs:
        raise SafealignError(f"dataset {path} has no pairs in split {split!r}; pass --split")
    rows = []
    for p in pairs:
        rows.append(dict(prompt=p.unsafe_prompt, category=p.category, seed=p.seed, set="unsafe",
                         concept=p.concept, pair=p.pair_id))
        rows.append(dict(prompt=p.safe_prompt, category=p.category, seed=p.seed, set="safe",
                         concept=p.concept, pair=p.pair_id))
    return finish_prompt_set(pd.DataFrame(rows), {"kind": "dataset", "path": str(path), "split": split}, 0)


def load_prompts(cfg) -> PromptSet:
    """The prompt set an :class:`~safealign.evaluate.config.EvaluateConfig` names."""
    spec, fmt = cfg.prompts, cfg.prompt_format
    from ..plugins import is_plugin_name
    if is_plugin_name(spec):
        from ..plugins import get_plugin
        return get_plugin(spec).evaluation_prompts(cfg.per_category, cfg.benign, cfg.seed, cfg.sets, cfg.categories)
    p = Path(spec)
    if not p.exists():
        raise SafealignError(f"--prompts {p} does not exist; pass 'world', a CSV/parquet file or a dataset folder")
    if fmt == "dataset" or (fmt == "auto" and p.is_dir()):
        ps = read_dataset(p, cfg.split)
    elif fmt == "i2p" or (fmt == "auto" and p.is_file() and _looks_i2p(p)):
        ps = read_i2p(p, cfg.seed)
    else:
        ps = read_table(p, cfg.seed)
    t = ps.table
    if cfg.categories:
        keep = t["category"].map(lambda c: any(x.strip() in cfg.categories for x in str(c).split(",")))
        t = t[keep]
        if len(t) == 0:
            raise SafealignError(f"--prompts {p} has no prompt of categories {', '.join(cfg.categories)}")
    if cfg.per_category:
        t = t.groupby(["set", "category"], sort=False, group_keys=False).head(cfg.per_category)
    ps.table = t.reset_index(drop=True)
    return ps


def _looks_i2p(p: Path) -> bool:
    if p.suffix != ".csv":
        return False
    try:
        cols = pd.read_csv(p, nrows=0).columns
    except Exception:  # noqa: BLE001
        return False
    return "categories" in cols and "sd_seed" in cols
