"""Harm taxonomies: categories -> concepts, each with its benign counterpart where one is known.

A model plugin brings its own (``load_taxonomy("world")`` asks the mini world's plugin). For a real model the user
supplies one as YAML or CSV (:func:`load_taxonomy`); ``configs/taxonomy_example.yaml`` shows the
format. Category names are normalised (lowercase, spaces and underscores to '-', CoProV2's spellings mapped), so
'Harrasment', 'self harm' and 'Illegal Activity' name the same categories as the world's ids.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SafealignError
from ..names import path_component

#: the 7 CoProV2 category ids (the mini world uses the same)
COPRO_CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal-activity")

#: spellings met in the wild -> our id (after lowercasing and '-' normalisation)
_ALIASES = {"harrasment": "harassment", "harrassment": "harassment", "selfharm": "self-harm",
            "self-harming": "self-harm", "illegal": "illegal-activity", "illegal-activities": "illegal-activity",
            "nudity": "sexual", "sex": "sexual", "shock": "shocking", "violent": "violence", "hateful": "hate"}


def normalise_category(name: object, where: str = "") -> str:
    """The one spelling of a category, used by every reader of categories (dataset tables, prompts files,
    taxonomies, ``--category``/``--categories``): Unicode-folded (NFKC), case-folded, white space and underscores
    to '-', known misspellings mapped: ' Violence ' -> 'violence', 'Harrasment' -> 'harassment',
    'Illegal Activity' -> 'illegal-activity', 'self_harm' -> 'self-harm'.

    A category names expert folders and report files, so it must be a plain name: empty, None, or anything
    :func:`safealign.names.path_component` refuses ('../x', '/abs', 'a/b', control characters) is a one-line
    :class:`SafealignError`; ``where`` says where the name was read.
    """
    if name is None or (isinstance(name, float) and name != name):  # None or NaN (a missing table cell)
        raise SafealignError(f"a category is missing{' in ' + where if where else ''}; every row needs one")
    key = unicodedata.normalize("NFKC", str(name)).strip().casefold()
    key = re.sub(r"[\s_]+", "-", key).strip("-")
    key = re.sub(r"-+", "-", key)
    if not key:
        raise SafealignError(f"category {name!r}{' in ' + where if where else ''} is empty; name every category")
    return path_component(_ALIASES.get(key, key), f"category{' in ' + where if where else ''}")


normalize_category = normalise_category  # the US spelling, same function


@dataclass(frozen=True)
class Concept:
    """One harmful concept and its benign counterpart (the word that replaces it in the safe prompt)."""

    name: str
    category: str
    counterpart: str | None = None


@dataclass(frozen=True)
class Taxonomy:
    """Categories -> concepts, in a fixed order (the file's order; the world's for the world)."""

    categories: dict[str, tuple[Concept, ...]]
    source: str = ""
    #: the model plugin whose prompt grammar writes this taxonomy's pairs ("world"), or "" for a file's taxonomy
    plugin: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.categories:
            raise SafealignError(f"taxonomy {self.source} is empty; it needs at least one category with one concept")
        for cat, concepts in self.categories.items():
            if not concepts:
                raise SafealignError(f"category {cat!r} in taxonomy {self.source} has no concepts")
            seen: set[str] = set()
            for c in concepts:
                k = c.name.strip().lower()
                if k in seen:
                    raise SafealignError(f"concept {c.name!r} appears twice in category {cat!r} of {self.source}")
                seen.add(k)

    @property
    def names(self) -> list[str]:
        return list(self.categories)

    def concepts(self, category: str | None = None) -> list[Concept]:
        if category is None:
            return [c for cs in self.categories.values() for c in cs]
        return list(self.categories[self._check(category)])

    def _check(self, category: str) -> str:
        cat = normalise_category(category)
        if cat not in self.categories:
            raise SafealignError(f"unknown category {category!r}; taxonomy {self.source} has "
                                 f"{', '.join(self.categories)}")
        return cat

    def select(self, categories: tuple[str, ...] | list[str] | None) -> Taxonomy:
        """The sub-taxonomy of ``categories`` (all when empty); an unknown name is an error listing the known."""
        if not categories:
            return self
        keep = [self._check(c) for c in categories]
        return Taxonomy({c: self.categories[c] for c in dict.fromkeys(keep)}, self.source, self.plugin, self.notes)

    def to_dict(self) -> dict:
        return {cat: [{"concept": c.name, "counterpart": c.counterpart} for c in cs]
                for cat, cs in self.categories.items()}


def load_taxonomy(spec: str) -> Taxonomy:
    """'world', or a YAML/JSON file (``categories: {cat: {concept: counterpart | null} | [concept | {concept,
    counterpart}]}``) or a CSV file (columns ``category,concept[,counterpart]``)."""
    from ..plugins import get_plugin, is_plugin_name
    if is_plugin_name(spec):
        return get_plugin(spec).taxonomy()
    p = Path(spec)
    if not p.is_file():
        raise SafealignError(f"taxonomy file {p} does not exist; pass 'world' or a YAML/CSV taxonomy "
                             "(see configs/taxonomy_example.yaml)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SafealignError(f"taxonomy file {p} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    if p.suffix.lower() == ".csv":
        return _from_csv(text, str(p))
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SafealignError(f"taxonomy file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        return _from_mapping(data, str(p))
    raise SafealignError(f"taxonomy file {p} must end in .yaml, .yml, .json or .csv")


def _clean(v, what: str, source: str) -> str:
    if not isinstance(v, (str, int, float)) or not str(v).strip():
        raise SafealignError(f"taxonomy {source}: {what} must be a non-empty string, got {v!r}")
    return re.sub(r"\s+", " ", str(v).strip())


def _from_mapping(data, source: str) -> Taxonomy:
    if isinstance(data, dict) and "categories" in data:
        data = data["categories"]
    if not data:
        raise SafealignError(f"taxonomy {source} is empty; it needs at least one category with one concept")
    if not isinstance(data, dict):
        raise SafealignError(f"taxonomy {source} must map category -> concepts (see configs/taxonomy_example.yaml)")
    cats: dict[str, list[Concept]] = {}
    for cat_raw, items in data.items():
        cat = normalise_category(_clean(cat_raw, "a category name", source), source)
        out = cats.setdefault(cat, [])
        if isinstance(items, dict):
            items = [{"concept": k, "counterpart": v} for k, v in items.items()]
        if not isinstance(items, list):
            raise SafealignError(f"taxonomy {source}: category {cat_raw!r} must hold a list or mapping of concepts")
        for it in items:
            if isinstance(it, dict):
                unknown = set(it) - {"concept", "counterpart"}
                if unknown or "concept" not in it:
                    raise SafealignError(f"taxonomy {source}: an entry of {cat_raw!r} must have 'concept' (and "
                                         f"optionally 'counterpart'), got keys {sorted(it)}")
                cp = it.get("counterpart")
                out.append(Concept(_clean(it["concept"], "a concept", source), cat,
                                   _clean(cp, "a counterpart", source) if cp not in (None, "") else None))
            else:
                out.append(Concept(_clean(it, "a concept", source), cat))
    return Taxonomy({k: tuple(v) for k, v in cats.items()}, source=source)


def _from_csv(text: str, source: str) -> Taxonomy:
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise SafealignError(f"taxonomy {source} is empty; it needs a header 'category,concept[,counterpart]' "
                             "and at least one row")
    cols = {c.strip().lower() for c in rows[0] if c}
    if not {"category", "concept"} <= cols:
        raise SafealignError(f"taxonomy {source} needs columns category and concept (and optionally "
                             f"counterpart); it has {', '.join(sorted(cols))}")
    data: dict[str, list] = {}
    for r in rows:
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in r.items()}
        data.setdefault(r["category"], []).append({"concept": r["concept"],
                                                   "counterpart": r.get("counterpart") or None})
    return _from_mapping(data, source)
