"""The report folder: ``charts/*.png`` (matplotlib, Agg), ``grids/*.png`` (same seed side by side, one column per
model) and ``index.html`` that shows them with the numbers and the settings that produced them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..names import slug as _slug  # chart and grid file names from set, category and attack names
from .headline import headline, headline_keys  # noqa: F401 - re-exported: the report's summary figures
from .page import render_html

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
