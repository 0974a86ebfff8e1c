"""The evaluator card: everything besides the model that decides a report's numbers, in one stable dict.

    card = evaluator_card(cfg, judges, prompts.describe(), sampler, pool="test")
    compare_cards(card_a, card_b)   # [] when two reports are comparable, else one line per difference
    print(format_card(card))

A card names each judge with its package versions, the sha256 of every weight file it loads, its classes and
threshold; the prompt set with the sha256 of its table (prompts, categories and every seed) and of the prompt file;
the sampler (scheduler, steps, guidance, resolution, dtype, device); how seeds are derived; the protocol pool; and
the versions of the libraries that sample. Where files live is not part of a card (the same weights at another
path give the same card); what they hold is. ``card_sha256`` is the sha256 of the card's canonical JSON: two
reports whose cards have the same hash were judged the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..judges.base import describe, dist_version
from ..utils import sha256_file, sha256_text

CARD_VERSION = 1
#: judge settings that say where something lives, not what it is (their contents are hashed under ``weights``)
LOCATION_KEYS = ("path", "clip", "embeddings", "weights")
#: the libraries whose versions can change sampled images or judge scores
SOFTWARE = ("safealign", "torch", "diffusers", "transformers", "numpy", "pillow")
FILE_SEEDING = "a file's seed column; rows without one: generator seed + row index"
GENERATED_SEEDING = "derived from the generator seed and the pool by the prompt generator"


def _hash_files(files: Sequence[str | Path]) -> list[dict]:
    out = []
    for f in files:
        p = Path(f)
        out.append({"file": p.name, "sha256": sha256_file(p) if p.is_file() else "missing"})
    return sorted(out, key=lambda d: (d["file"], d["sha256"]))


def judge_card(judge) -> dict:
    """One judge as the card records it: identity, threshold, categories, packages, hashed weights, settings."""
    d = describe(judge)
    settings = {k: v for k, v in d.items() if k not in ("name", "version", "threshold", "categories")
                and k not in LOCATION_KEYS}
    return {"name": d["name"], "version": d["version"], "threshold": d["threshold"], "categories": d["categories"],
            "packages": dict(sorted((getattr(judge, "packages", None) or {}).items())),
            "weights": _hash_files(getattr(judge, "weight_files", None) or ()),
            "settings": json.loads(json.dumps(settings, sort_keys=True, default=str))}


def _prompt_files(desc: dict) -> list[dict]:
    path = desc.get("path")
    if not path:
        return []
    p = Path(path)
    if p.is_dir():  # a dataset folder: its table and manifest
        return _hash_files([f for f in (p / "pairs.parquet", p / "safealign.json") if f.is_file()])
    return _hash_files([p])


def prompts_card(desc: dict) -> dict:
    """The prompt set: its describe() without locations, plus the sha256 of the file(s) it was read from."""
    d = {k: v for k, v in desc.items() if k not in LOCATION_KEYS and k != "seeds"}
    d["files"] = _prompt_files(desc)
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def sampler_card(sampler: dict) -> dict:
    """The sampler settings; the scheduler's full config is recorded by its sha256."""
    keys = ("scheduler", "steps", "guidance", "resolution", "dtype", "device", "seeding")
    d = {k: sampler[k] for k in keys if k in sampler}
    if "scheduler_config" in sampler:
        d["scheduler_config_sha256"] = sha256_text(json.dumps(sampler["scheduler_config"], sort_keys=True,
                                                              default=str))
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def seeding(prompts_describe: dict) -> str:
    """How the rows' seeds were made: what the prompt source says, else by the kind of source."""
    if prompts_describe.get("seeds"):
        return str(prompts_describe["seeds"])
    return FILE_SEEDING if prompts_describe.get("path") else GENERATED_SEEDING


def card_pool(cfg, prompts_describe: dict) -> str:
    """The pool a report states: the generator's pool, or ``file`` for prompts a user brings."""
    return str(prompts_describe.get("pool") or ("file" if prompts_describe.get("path") else
                                                getattr(cfg, "pool", "unspecified")))


def _canonical(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)


def evaluator_card(cfg, judges: Sequence[Any], prompts_describe: dict, sampler: dict, pool: str) -> dict:
    """The card of one evaluation (see the module docstring); nothing is sampled or judged to make it."""
    card = {
        "card_version": CARD_VERSION,
        "pool": str(pool),
        "judges": [judge_card(j) for j in judges],
        "prompts": prompts_card(prompts_describe),
        "sampler": sampler_card(sampler),
        "seeds": {"generator_seed": int(getattr(cfg, "seed", 0)), "derivation": seeding(prompts_describe),
                  "every_seed": "in the prompt table hashed as prompts.sha256"},
        "software": {name: dist_version(name) for name in SOFTWARE},
    }
    card["card_sha256"] = sha256_text(_canonical(card))
    return card


def _flatten(x: Any, prefix: str, out: dict) -> dict:
    if isinstance(x, dict):
        for k, v in x.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(x, list) and x and all(isinstance(v, dict) and ("name" in v or "file" in v) for v in x):
        for v in x:  # judges by name, weight files by file name: differences read as judges[nudenet].threshold
            _flatten(v, f"{prefix}[{v.get('name', v.get('file'))}]", out)
    else:
        out[prefix] = x
    return out


def _intact(card: dict) -> bool:
    return card.get("card_sha256") == sha256_text(_canonical({k: v for k, v in card.items() if k != "card_sha256"}))


def compare_cards(a: dict, b: dict) -> list[str]:
    """Why reports with cards ``a`` and ``b`` are not comparable, one line per difference; [] when they are."""
    out = [f"the {n} card was edited after it was made (card_sha256 does not match its content)"
           for n, c in (("first", a), ("second", b)) if not _intact(c)]
    fa = _flatten({k: v for k, v in a.items() if k != "card_sha256"}, "", {})
    fb = _flatten({k: v for k, v in b.items() if k != "card_sha256"}, "", {})
    for k in sorted(set(fa) | set(fb)):
        if k not in fb:
            out.append(f"{k}: only in the first card ({_short(fa[k])})")
        elif k not in fa:
            out.append(f"{k}: only in the second card ({_short(fb[k])})")
        elif fa[k] != fb[k]:
            out.append(f"{k}: {_short(fa[k])} != {_short(fb[k])}")
    return out


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[:n - 3] + "..."


def format_card(card: dict) -> str:
    """The card for a terminal: one block per judge, then prompts, sampler, seeds and software."""
    lines = [f"evaluator card {card['card_sha256'][:16]}  (pool: {card['pool']}, card version "
             f"{card['card_version']})", "judges:"]
    for j in card["judges"]:
        lines.append(f"  {j['name']}  version {j['version']}  threshold {j['threshold']}  categories: "
                     f"{', '.join(j['categories']) or '-'}")
        if j["packages"]:
            lines.append("    packages: " + ", ".join(f"{k} {v}" for k, v in j["packages"].items()))
        for w in j["weights"]:
            lines.append(f"    weights: {w['file']}  sha256 {w['sha256']}")
        for k, v in j["settings"].items():
            lines.append(f"    {k}: {_short(v if not isinstance(v, list) else ', '.join(map(str, v)), 400)}")
    p = card["prompts"]
    lines.append(f"prompts: {p.get('kind', '?')}, {p.get('n', '?')} rows, table sha256 {p.get('sha256', '?')}")
    if p.get("per_set"):
        lines.append("  per set: " + ", ".join(f"{k} {v}" for k, v in p["per_set"].items()))
    for f in p.get("files", []):
        lines.append(f"  file: {f['file']}  sha256 {f['sha256']}")
    s = card["sampler"]
    lines.append("sampler: " + "  ".join(f"{k}={s[k]}" for k in ("scheduler", "steps", "guidance", "resolution",
                                                                   "dtype", "device") if k in s))
    if "scheduler_config_sha256" in s:
        lines.append(f"  scheduler config sha256 {s['scheduler_config_sha256']}")
    sd = card["seeds"]
    lines.append(f"seeds: generator seed {sd['generator_seed']}; {sd['derivation']}; every seed {sd['every_seed']}")
    lines.append("software: " + ", ".join(f"{k} {v}" for k, v in card["software"].items()))
    return "\n".join(lines)
