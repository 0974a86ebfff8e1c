"""``index.html`` of a report folder, for a reader with a minute: the verdict table first (per model: IP under
unsafe, held-out, safe-twin and benign prompts and object accuracy, each with its interval and the paired
difference to the base and to the aligned model), then per category, attacks, image grids, the evaluator card and
the configuration."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

import numpy as np

from .headline import headline, headline_keys

#: the verdict table's columns: (title, prompt set whose IP it shows, or the object-accuracy entry)
VERDICT_COLUMNS = (("IP, unsafe prompts", "unsafe"), ("IP, held-out phrasings", "heldout"),
                   ("IP, safe twins", "safe"), ("IP, benign prompts", "benign"), ("object accuracy", None))
STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right;vertical-align:top}"
         "th{background:#f3f3f3}td small{color:#555}.worse{color:#b00}.better{color:#070}"
         "figure{display:inline-block;margin:.4em;vertical-align:top}figure img{max-width:620px}"
         "figcaption{font-size:12px;max-width:480px}pre{background:#f7f7f7;padding:.5em;font-size:12px;"
         "overflow-x:auto}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if not np.isfinite(v) else f"{v:.3f}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    return "-" if v is None else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (cells built here from numbers)."""
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{v if raw and isinstance(v, str) else e(_fmt(v))}</td>" for v in r)
                   + "</tr>")
    return "\n".join(out) + "</table>"


def _p(p: float | None) -> str | None:
    if p is None or not np.isfinite(p):
        return None
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cell(rate: dict | None, diffs: Sequence[tuple[str, dict | None]], higher_is_worse: bool) -> str:
    """``value [lo, hi]`` and, per reference, ``Δ delta [lo, hi] p`` coloured by direction when significant."""
    if not rate or not np.isfinite(rate.get("value", float("nan"))):
        return "-"
    lo, hi = rate.get("ci95", [float("nan")] * 2)
    out = [f"<b>{rate['value']:.3f}</b> <small>[{lo:.2f}, {hi:.2f}] n={rate.get('n', '?')}</small>"]
    for ref, d in diffs:
        if not d or not np.isfinite(d.get("delta", float("nan"))):
            continue
        sig = d.get("p_value", 1.0) < 0.05
        cls = "" if not sig else (" class='worse'" if (d["delta"] > 0) == higher_is_worse else " class='better'")
        a, b = d["ci95"]
        out.append(f"<small{cls}>vs {html.escape(ref)} {d['delta']:+.3f} [{a:+.2f}, {b:+.2f}] p "
                   f"{html.escape(_p(d['p_value']) or '-')}</small>")
    return "<br>".join(out)


def verdict_rows(report: dict) -> list[list[str]]:
    """One row per model: its name, then each :data:`VERDICT_COLUMNS` cell (HTML)."""
    base = report.get("config", {}).get("base_name", "base")
    rows = []
    for name, r in report["results"].items():
        row = [html.escape(name)]
        for _, s in VERDICT_COLUMNS:
            if s is None:
                acc = r.get("object_accuracy")
                row.append(_cell(acc, [(base, (acc or {}).get("vs_base")), ("aligned", (acc or {}).get("vs_aligned"))],
                                 higher_is_worse=False))
                continue
            rate = r["sets"].get(s, {}).get("ip", {}).get("overall")
            comp = r.get("comparisons", {})
            diffs = [(base, comp.get("vs_base", {}).get(s, {}).get("overall")),
                     ("aligned", comp.get("vs_aligned", {}).get(s, {}).get("overall"))]
            row.append(_cell(rate, diffs, higher_is_worse=True))
        rows.append(row)
    return rows


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


def _header(report: dict) -> list[str]:
    e = html.escape
    bm = report["base_model"]
    pool = report.get("pool", "file")
    return ["<h1>safealign evaluation report</h1>",
            f"<p>base model <code>{e(str(bm.get('source')))}</code> ({e(str(bm.get('family')))}); "
            f"{report['prompts']['n']} prompts from <b>pool {e(str(pool))}</b>; judges "
            f"{e(', '.join(j['name'] + ' >= ' + str(j['threshold']) for j in report['judges']))}; sampler "
            f"{e(report['sampler']['scheduler'])}, {report['sampler']['steps']} steps, guidance "
            f"{report['sampler']['guidance']}; {report['seconds']} s</p>"]


def _verdict(report: dict) -> list[str]:
    return ["<h2>Verdict</h2>",
            "<p>IP = share of images a judge flags (any category), per prompt set. Each cell: the rate, its Wilson "
            "95% interval and n; under it the paired change against the base and the aligned model on the same "
            "prompts and seeds (Newcombe interval, exact McNemar p; red: significantly worse, green: better). "
            "Lower IP is better; higher object accuracy (safe-twin and benign prompts) is better.</p>",
            _table(["model", *[t for t, _ in VERDICT_COLUMNS]], verdict_rows(report), raw=True)]


def _per_category(report: dict) -> list[str]:
    names = list(report["results"])
    parts = ["<h2>Per category</h2>"]
    for s in ("unsafe", "heldout", "safe"):
        cats = sorted({c for r in report["results"].values()
                       for c in r["sets"].get(s, {}).get("ip", {}).get("per_category", {})})
        if not cats:
            continue
        rows = [[c, *[report["results"][n]["sets"].get(s, {}).get("ip", {}).get("per_category", {}).get(c) or {}
                      for n in names]] for c in cats]
        parts.append(f"<h3>IP, {html.escape(s)} prompts</h3>")
        parts.append(_table(["category", *names], [[r[0], *[_cell(x, [], True) for x in r[1:]]] for r in rows],
                            raw=True))
    comp = comparison_rows(report)
    if comp:
        parts.append("<h3>Paired comparisons</h3><p>IP change against the reference model, same prompts and "
                     "seeds; per category (unsafe prompts) Holm-adjusted across the categories.</p>")
        parts.append(_table(["model", "vs", "prompt set", "category", "n", "IP change", "95% CI", "p", "p (Holm)"],
                            comp))
    return parts


def _quality(report: dict) -> list[str]:
    h = headline(report)
    keys = [k for k in headline_keys(h) if not k.startswith("ip/")]
    if not keys:
        return []
    return ["<h2>Quality and attacks (all figures)</h2>",
            "<p>FID/KID and CLIP score on the benign prompts only; <code>fid_vs_base</code> is the distance to the "
            "base model's own images (drift, not quality).</p>",
            _table(["model", *keys], [[n, *[d.get(k) for k in keys]] for n, d in h.items()])]


def _figures(items: list[dict], title: str) -> list[str]:
    e = html.escape
    parts = [f"<h2>{e(title)}</h2>"]
    for g in items:
        cap = "; ".join(f"{e(p)} (seed {s})" for p, s in g.get("prompts", []))
        parts.append(f"<figure><img src='{e(g['file'])}' alt='{e(g['title'])}'><figcaption><b>{e(g['title'])}"
                     f"</b>{'<br>' + cap if cap else ''}</figcaption></figure>")
    return parts


def render_html(report: dict, charts: list[dict], grids: list[dict]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>safealign evaluation report</title>"
             f"<style>{STYLE}</style></head><body>", *_header(report), *_verdict(report), *_per_category(report),
             *_quality(report), *_figures(charts, "Charts"),
             *_figures(grids, "Images: the same seed side by side (one column per model)")]
    card = report.get("card")
    if card:
        parts.append("<h2>Evaluator card</h2><p>Two reports with equal cards (same judges, weights, prompts, "
                     "sampler, seeds and pool) are comparable.</p><pre>" + e(json.dumps(card, indent=1)) + "</pre>")
    parts.append("<h2>Models</h2>")
    parts.append(_table(["model", "LoRA files", "role"],
                        [[m["name"], " + ".join(x["path"] for x in m["loras"]) or "(none)",
                          ", ".join(str(x.get("role")) for x in m["loras"])] for m in report["models"]]))
    parts.append("<h2>Configuration</h2><pre>" + e(json.dumps(report["config"], indent=1)) + "</pre>")
    parts.append("<p>Every figure with its interval is in <a href='report.json'>report.json</a>; per-image scores "
                 "in <a href='scores.csv'>scores.csv</a>.</p></body></html>")
    return "\n".join(parts)
