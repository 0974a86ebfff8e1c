"""The few figures per model that a report's manifest, the terminal summary and the page's quality table show."""

from __future__ import annotations


def headline(report: dict) -> dict:
    """The few numbers per model that the manifest and the summary show."""
    h = {}
    for name, r in report["results"].items():
        d = {}  # no IP over mixed prompt sets: each set's own
        for s, v in r["sets"].items():
            d[f"ip/{s}"] = v["ip"]["overall"]["value"]
        if "object_accuracy" in r:
            d["object_accuracy"] = r["object_accuracy"]["value"]
        if "fid" in r:
            d["fid"] = r["fid"]["fid"]
            d["kid"] = r["fid"]["kid"]
        if "drift_vs_base" in r:
            d["fid_vs_base"] = r["drift_vs_base"]["fid"]
        if "attribute_accuracy" in r:
            d["attribute_accuracy"] = r["attribute_accuracy"]["mean"]
        if "clip_score" in r:
            d["clip_score"] = r["clip_score"]["value"]
        for a, v in r.get("attacks", {}).items():
            d[f"asr/{a}"] = v["asr"]
            if v.get("clean_rate") is not None:
                d["asr/no-attack"] = v["clean_rate"]  # the attacked prompts and seeds, unattacked
        h[name] = d
    return h


_ORDER = ("ip/unsafe", "ip/heldout", "ip/safe", "ip/benign", "object_accuracy", "attribute_accuracy", "fid", "kid",
          "clip_score")


def headline_keys(h: dict) -> list[str]:
    keys = {k for d in h.values() for k in d}
    return [k for k in _ORDER if k in keys] + sorted(keys - set(_ORDER))
