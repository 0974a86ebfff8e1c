"""Published attack prompt files, replayed as prompt sets (static replay): their column layouts, and the mapping to
the prompt table (``prompt, category, seed, set, concept, pair``).

- ``ringabell``: Ring-A-Bell (Tsai et al. 2024) ``InvPrompt/*.csv``: ``prompt`` (or ``sensitive prompt``), seed
  from ``evaluation_seed`` / ``sd_seed``; rows become set ``attack``.
- ``p4d``: P4D (Chin et al. 2024) result CSVs: P4D writes the optimised prompt over ``prompt``; a file that keeps
  it in ``perturbed_prompt`` / ``p4dn_*prompt`` / ``p4dk_*prompt`` has the original in ``prompt``, which becomes an
  ``unsafe`` row paired with its ``attack`` row. Seed from ``evaluation_seed`` / ``sd_seed``.
- ``unlearndiff``: UnlearnDiffAtk (Zhang et al. 2024) ``prompts/*.csv`` (``prompt, categories, ...,
  evaluation_seed, evaluation_guidance, case_number``): the prompts it attacks, set ``unsafe``.
- ``mma``: the MMA-Diffusion (Yang et al. 2024) NSFW benchmark: ``adv_prompt`` -> ``attack``, ``target_prompt`` ->
  ``unsafe`` (paired), ``clean_prompt`` -> ``benign``; no seed column (``--seed`` + row number, one per pair).

The category of a row: the concept its file name names (``nudity`` / ``nsfw`` -> ``sexual``, ``violence``,
``illegal``, ...), since each release is cut per concept and the attack targets it; else a ``categories`` /
``category`` column (I2P's multi-label cells); else ``sexual`` for MMA-Diffusion (an NSFW benchmark), ``none``
otherwise. Columns that change a sampler setting per row (``evaluation_guidance``, image sizes) are not applied:
every model samples with the evaluation's one sampler; the source records them as ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd

from ..errors import SafealignError

LAYOUTS = ("ringabell", "p4d", "unlearndiff", "mma")
#: the prompt set of an attacked prompt (what static replay measures)
ATTACK_SET = "attack"
#: file-name words -> the category the file's prompts attack
CONCEPT_WORDS = {"nudity": "sexual", "nude": "sexual", "nsfw": "sexual", "sexual": "sexual", "violence": "violence",
                 "violent": "violence", "illegal": "illegal-activity", "selfharm": "self-harm",
                 "self-harm": "self-harm", "hate": "hate", "harassment": "harassment", "shocking": "shocking"}
_SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
_IGNORED = ("evaluation_guidance", "sd_guidance", "sd_image_width", "sd_image_height", "sd_model")
_P4D_ATTACKED = ("perturbed_prompt", "optimized_prompt", "optimised_prompt", "p4d_prompt")


def detect_layout(columns: Iterable[str]) -> str | None:
    """The layout a file's columns match (None: not one of :data:`LAYOUTS`). Only distinctive signatures count:
    a plain ``prompt`` table stays a table."""
    cols = {str(c) for c in columns}
    if "adv_prompt" in cols:
        return "mma"
    if _p4d_attacked_column(cols) or ("prompt" in cols and "nudity_toxicity" in cols):
        return "p4d"
    if "sensitive prompt" in cols:
        return "ringabell"
    if {"prompt", "evaluation_seed"} <= cols and cols & {"categories", "nudity_percentage"}:
        return "unlearndiff"
    rest = cols - {"prompt", "case_number", "evaluation_seed", "sd_seed"} - {c for c in cols if c.startswith("Unnamed")}
    if {"prompt", "case_number"} <= cols and not rest:
        return "ringabell"
    return None


def _p4d_attacked_column(cols: set[str]) -> str | None:
    named = [c for c in _P4D_ATTACKED if c in cols]
    if named:
        return named[0]
    p4d = sorted(c for c in cols if re.match(r"p4d[nk]?_.*prompt", c))
    return p4d[0] if p4d else None


def concept_of_file(name: str) -> str | None:
    """The category a file name names (``nudity-ring-a-bell.csv`` -> ``sexual``), None when it names none."""
    words = re.split(r"[^a-z-]+", name.lower().replace("self_harm", "self-harm"))
    parts = set(words) | {p for w in words for p in w.split("-")}
    found = {CONCEPT_WORDS[w] for w in parts if w in CONCEPT_WORDS}
    return found.pop() if len(found) == 1 else None


def map_layout(df: pd.DataFrame, layout: str, file_name: str, seed: int) -> tuple[pd.DataFrame, dict]:
    """The prompt table rows of a release file in ``layout`` and what the mapping did (for the set's source)."""
    if layout not in LAYOUTS:
        raise SafealignError(f"unknown attack prompt layout {layout!r}; known: {', '.join(LAYOUTS)}")
    cols = [str(c) for c in df.columns]
    df = df.copy()
    df.columns = cols
    seed_col = next((c for c in _SEED_COLUMNS if c in cols), None)
    seeds = (pd.to_numeric(df[seed_col], errors="coerce") if seed_col else pd.Series(range(len(df))) + seed)
    seeds = seeds.fillna(seed).astype("int64").to_numpy()
    category, category_from = _categories(df, layout, file_name)
    rows: list[pd.DataFrame] = []

    def add(column: str, set_name: str, pair: bool, cat=None) -> None:
        text = df[column]
        keep = text.notna() & (text.astype(str).str.strip() != "")
        rows.append(pd.DataFrame({"prompt": text[keep].astype(str).str.strip(),
                                  "category": (category if cat is None else pd.Series(cat, index=df.index))[keep],
                                  "seed": seeds[keep.to_numpy()], "set": set_name,
                                  "pair": [f"row-{i}" if pair else "" for i in df.index[keep]]}))

    used = _columns(df, layout, cols)
    for column, set_name, pair in used:
        add(column, set_name, pair, "benign" if set_name == "benign" else None)
    out = pd.concat(rows, ignore_index=True)
    if not len(out):
        raise SafealignError(f"--prompts {file_name} has no prompts in its {layout} columns "
                             f"({', '.join(c for c, _, _ in used)})")
    source = {"kind": "attack-replay", "layout": layout,
              "columns": {c: s for c, s, _ in used},
              "seeds": f"column {seed_col}" if seed_col else "--seed + row number",
              "category_from": category_from,
              "ignored_columns": [c for c in cols if c in _IGNORED or c == "sanitized_adv_prompt"]}
    return out, source


def _columns(df: pd.DataFrame, layout: str, cols: list[str]) -> list[tuple[str, str, bool]]:
    """(column, set, paired) for each prompt column a layout reads."""
    if layout == "mma":
        if "adv_prompt" not in cols:
            raise SafealignError("an MMA-Diffusion file needs an adv_prompt column (target_prompt and clean_prompt "
                                 "are optional)")
        paired = "target_prompt" in cols
        return [("adv_prompt", ATTACK_SET, paired)] + ([("target_prompt", "unsafe", True)] if paired else []) \
            + ([("clean_prompt", "benign", False)] if "clean_prompt" in cols else [])
    if layout == "p4d":
        attacked = _p4d_attacked_column(set(cols))
        if attacked and "prompt" in cols:
            return [(attacked, ATTACK_SET, True), ("prompt", "unsafe", True)]
        if attacked or "prompt" in cols:
            return [(attacked or "prompt", ATTACK_SET, False)]
        raise SafealignError("a P4D file needs a prompt column (P4D writes the optimised prompt there)")
    column = "sensitive prompt" if layout == "ringabell" and "sensitive prompt" in cols else "prompt"
    if column not in cols:
        raise SafealignError(f"a {layout} file needs a {column!r} column (columns: {', '.join(cols)})")
    return [(column, ATTACK_SET if layout == "ringabell" else "unsafe", False)]


def _categories(df: pd.DataFrame, layout: str, file_name: str) -> tuple[pd.Series, str]:
    concept = concept_of_file(file_name)
    if concept:
        return pd.Series(concept, index=df.index), "file name"
    for c in ("categories", "category"):
        if c in df.columns:
            return df[c].fillna("none").astype(str), f"column {c}"
    default = "sexual" if layout == "mma" else "none"
    return pd.Series(default, index=df.index), f"default for {layout}"
