"""The report folder: ``charts/*.png`` (matplotlib, Agg), ``grids/*.png`` (same seed side by side, one column per
model) and ``index.html`` that shows them with the numbers and the settings that produced them."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

TILE = 96  # grid tile size in pixels (small images are enlarged, nearest neighbour)


# -- charts ---------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def bar_chart(path: Path, title: str, per_model: dict[str, dict[str, dict]], ylabel: str = "IP") -> Path:
    """Grouped bars: categories on x, one bar per model, 95% interval as error bars."""
    plt = _plt()
    cats = sorted({c for d in per_model.values() for c in d})
    names = list(per_model)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cats) * max(1, len(names)) ** 0.5 + 2), 3.4), dpi=100)
    x = np.arange(len(cats))
    for k, n in enumerate(names):
        vals = np.array([per_model[n].get(c, {}).get("value", np.nan) for c in cats], float)
        lo = np.array([per_model[n].get(c, {}).get("ci95", [np.nan])[0] for c in cats], float)
        hi = np.array([per_model[n].get(c, {}).get("ci95", [np.nan, np.nan])[1] for c in cats], float)
        err = np.stack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
        has_ci = bool(np.isfinite(err).any())
        ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, label=n,
               yerr=np.nan_to_num(err) if has_ci else None, capsize=2 if has_ci else 0)
    ax.set_xticks(x, cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmap(path: Path, title: str, rows: dict[str, dict[str, float]], models: Sequence[str],
            diverging: bool = False) -> Path:
    """category x model matrix with the value written in each cell."""
    plt = _plt()
    cats = list(rows)
    m = np.array([[rows[c].get(n, np.nan) for n in models] for c in cats], float)
    fig, ax = plt.subplots(figsize=(1.2 * len(models) + 2.5, 0.4 * len(cats) + 1.4), dpi=100)
    if diverging:
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    else:
        im = ax.imshow(m, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(cats)), cats, fontsize=8)
    for i in range(len(cats)):
        for j in range(len(models)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:+.2f}" if diverging else f"{m[i, j]:.2f}", ha="center", va="center",
                        fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- grids ----------------------------------------------------------------------------------------------------

def side_by_side(path: Path, columns: dict[str, np.ndarray], tile: int = TILE) -> Path:
    """One column per model (header = its name), one row per prompt/seed: the same seed side by side."""
    from PIL import Image, ImageDraw
    names = list(columns)
    n = len(next(iter(columns.values())))
    head = 14
    grid = Image.new("RGB", (len(names) * (tile + 4) + 4, head + n * (tile + 4) + 4), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        d.text((4 + j * (tile + 4), 2), name[: tile // 6], fill=(0, 0, 0))
        for i, a in enumerate(columns[name]):
            im = Image.fromarray(a)
            im = im.resize((tile, tile), Image.NEAREST if im.width < tile else Image.BICUBIC)
            grid.paste(im, (4 + j * (tile + 4), head + 4 + i * (tile + 4)))
    grid.save(path)
    return path


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)


# -- the folder -----------------------------------------------------------------------------------------------

def write_report(folder: Path, report: dict, table: pd.DataFrame, images: dict[str, np.ndarray],
                 attack_images: dict, grid_rows: int = 4) -> dict:
    """Write charts/, grids/ and index.html into ``folder``; records the file lists in ``report['files']``."""
    folder = Path(folder)
    (folder / "charts").mkdir(parents=True, exist_ok=True)
    (folder / "grids").mkdir(parents=True, exist_ok=True)
    res = report["results"]
    names = list(res)
    charts: list[dict] = []
    sets = list(dict.fromkeys(table["set"]))
    for s in sets:
        per = {n: res[n]["sets"][s]["ip"]["per_category"] for n in names if s in res[n]["sets"]}
        p = bar_chart(folder / "charts" / f"ip_{_slug(s)}.png", f"IP per category, {s} prompts (95% CI)", per)
        charts.append({"file": f"charts/{p.name}", "title": f"IP per category: {s} prompts"})
        if s in ("unsafe", "heldout"):
            per = {n: res[n]["sets"][s]["hazard_rate"]["per_category"] for n in names}
            p = bar_chart(folder / "charts" / f"hazard_{_slug(s)}.png",
                          f"hazard rate in the prompt's own category, {s} prompts", per, "hazard rate")
            charts.append({"file": f"charts/{p.name}", "title": f"own-category hazard rate: {s} prompts"})
    col = report.get("collateral", {})
    for s, d in col.items():
        if s == "benign":
            continue
        p = heatmap(folder / "charts" / f"heatmap_{_slug(s)}.png", f"IP, {s} prompts: category x model", d["ip"],
                    names)
        charts.append({"file": f"charts/{p.name}", "title": f"category x model, {s} prompts"})
        if d.get("delta_vs_base") and len(names) > 1:
            base = report.get("config", {}).get("base_name", "base")
            others = [n for n in names if n != base]
            p = heatmap(folder / "charts" / f"delta_{_slug(s)}.png", f"IP change vs base, {s} prompts",
                        d["delta_vs_base"], others, diverging=True)
            charts.append({"file": f"charts/{p.name}", "title": f"effect of each model on every category ({s})"})
    attack_names = sorted({a for n in names for a in res[n].get("attacks", {})})
    for a in attack_names:
        per = {n: {c: {"value": v["asr"]} for c, v in res[n]["attacks"][a]["per_category"].items()} for n in names}
        p = bar_chart(folder / "charts" / f"asr_{_slug(a)}.png", f"attack success rate: {a}", per, "ASR")
        charts.append({"file": f"charts/{p.name}", "title": f"attack success rate: {a}"})

    grids: list[dict] = []
    for (s, c), rows in table.groupby(["set", "category"], sort=False):
        idx = rows.index.to_numpy()[:grid_rows]
        p = side_by_side(folder / "grids" / f"{_slug(s)}_{_slug(c)}.png", {n: images[n][idx] for n in names})
        grids.append({"file": f"grids/{p.name}", "title": f"{s} / {c}",
                      "prompts": [(table["prompt"][i], int(table["seed"][i])) for i in idx]})
    for a in attack_names:
        for c in attack_images[names[0]].get(a, {}):
            p = side_by_side(folder / "grids" / f"attack_{_slug(a)}_{_slug(c)}.png",
                             {n: attack_images[n][a][c] for n in names})
            grids.append({"file": f"grids/{p.name}", "title": f"attack {a} / {c}", "prompts": []})
    report["files"] = {"charts": [c["file"] for c in charts], "grids": [g["file"] for g in grids]}
    (folder / "index.html").write_text(render_html(report, charts, grids))
    return report["files"]


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in r) + "</tr>")
    return "\n".join(out) + "</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if not np.isfinite(v) else f"{v:.3f}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    return "-" if v is None else str(v)


def render_html(report: dict, charts: list[dict], grids: list[dict]) -> str:
    e = html.escape
    h = headline(report)
    keys = headline_keys(h)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>safealign evaluation report</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}"
             "th{background:#f3f3f3}figure{display:inline-block;margin:.4em;vertical-align:top}"
             "figure img{max-width:620px}"
             "figcaption{font-size:12px;max-width:480px}pre{background:#f7f7f7;padding:.5em;font-size:12px;"
             "overflow-x:auto}</style></head><body>",
             "<h1>safealign evaluation report</h1>",
             f"<p>base model: <code>{e(str(report['base_model'].get('source')))}</code> "
             f"({e(str(report['base_model'].get('family')))}, fingerprint "
             f"{e(str(report['base_model'].get('fingerprint')))}); {report['prompts']['n']} prompts; "
             f"{report['seconds']} s</p>",
             "<h2>Summary</h2>", _table(["model", *keys], [[n, *[d.get(k) for k in keys]] for n, d in h.items()]),
             "<h2>Models</h2>",
             _table(["model", "LoRA files", "role", "categories"],
                    [[m["name"], " + ".join(x["path"] for x in m["loras"]) or "(none)",
                      ", ".join(str(x.get("role")) for x in m["loras"]),
                      ", ".join(",".join(x.get("categories") or []) for x in m["loras"])] for m in report["models"]]),
             "<h2>Judges and sampler</h2>",
             _table(["judge", "version", "threshold", "categories"],
                    [[j["name"], j["version"], j["threshold"], ", ".join(j["categories"])] for j in report["judges"]]),
             f"<p>sampler: {e(report['sampler']['scheduler'])}, {report['sampler']['steps']} steps, guidance "
             f"{report['sampler']['guidance']}, {e(report['sampler']['seeding'])}; FID features: "
             f"{e(str(report['fid']['features']))} (reference: {e(str(report['fid']['reference']))})</p>",
             "<h2>IP per category (overall)</h2>"]
    cats = sorted({c for r in report["results"].values() for c in r["ip"]["per_category"]})
    parts.append(_table(["category", *[f"{n} IP" for n in h], *[f"{n} 95% CI" for n in h]],
                        [[c, *[report["results"][n]["ip"]["per_category"].get(c, {}).get("value") for n in h],
                          *[report["results"][n]["ip"]["per_category"].get(c, {}).get("ci95") for n in h]]
                         for c in cats]))
    comp = comparison_rows(report)
    if comp:
        parts.append("<h2>Paired comparisons (same prompts and seeds)</h2><p>IP change of each model against the "
                     "reference, with the Newcombe 95% interval and the exact McNemar p-value; per category (unsafe "
                     "prompts) also Holm-adjusted across the categories. Every set's categories are in "
                     "report.json.</p>")
        parts.append(_table(["model", "vs", "prompt set", "category", "n", "IP change", "95% CI", "p", "p (Holm)"],
                            comp))
    parts.append("<h2>Charts</h2>")
    for c in charts:
        parts.append(f"<figure><img src='{e(c['file'])}' alt='{e(c['title'])}'><figcaption>{e(c['title'])}"
                     "</figcaption></figure>")
    parts.append("<h2>Images: the same seed side by side (one column per model)</h2>")
    for g in grids:
        cap = "; ".join(f"{e(p)} (seed {s})" for p, s in g["prompts"])
        parts.append(f"<figure><img src='{e(g['file'])}' alt='{e(g['title'])}'><figcaption><b>{e(g['title'])}</b>"
                     f"<br>{cap}</figcaption></figure>")
    parts.append("<h2>Configuration</h2><pre>" + e(json.dumps(report["config"], indent=1)) + "</pre>")
    parts.append("<p>Everything above, with per-category intervals, is in <a href='report.json'>report.json</a>; "
                 "per-image scores in <a href='scores.csv'>scores.csv</a>.</p></body></html>")
    return "\n".join(parts)


def comparison_rows(report: dict, per_category_sets: Sequence[str] = ("unsafe",)) -> list[list]:
    """Rows ``[model, reference, set, category, n, delta, ci95, p, p_holm]`` of the paired comparisons: each
    set's overall row, and per category for ``per_category_sets``. The reference is the model a ``vs_<name>`` key
    names (``vs_base``: the base row)."""
    base = report.get("config", {}).get("base_name", "base")
    rows = []
    for name, r in report["results"].items():
        for key, per_set in r.get("comparisons", {}).items():
            ref = base if key == "vs_base" else key.removeprefix("vs_")
            for s, d in per_set.items():
                cats = d["per_category"].items() if s in per_category_sets else ()
                for cat, c in [("(all)", d["overall"]), *cats]:
                    delta = f"{c['delta']:+.3f}" if np.isfinite(c["delta"]) else None
                    rows.append([name, ref, s, cat, c["n"], delta, c["ci95"], _p(c["p_value"]), _p(c.get("p_holm"))])
    return rows


def _p(p: float | None) -> str | None:
    if p is None or not np.isfinite(p):
        return None
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def headline(report: dict) -> dict:
    """The few numbers per model that the manifest and the summary show."""
    h = {}
    for name, r in report["results"].items():
        d = {"ip": r["ip"]["overall"]["value"]}
        for s, v in r["sets"].items():
            d[f"ip/{s}"] = v["ip"]["overall"]["value"]
        if "fid" in r:
            d["fid"] = r["fid"]["fid"]
            d["kid"] = r["fid"]["kid"]
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


_ORDER = ("ip", "ip/unsafe", "ip/heldout", "ip/safe", "ip/benign", "attribute_accuracy", "fid", "kid", "clip_score")


def headline_keys(h: dict) -> list[str]:
    keys = {k for d in h.values() for k in d}
    return [k for k in _ORDER if k in keys] + sorted(keys - set(_ORDER))
