"""`make demo`: the whole method end to end on the mini world (``safealign run world``).

It prints the hazard rate per category of the base, the aligned model (one Diffusion-DPO expert per category merged
into one LoRA), and the aligned model after benign fine-tuning (Modular LoRA against the sequential and full
fine-tune baselines), and the paths of the HTML reports. ``--tiny`` instead trains one expert per category on a tiny
pipeline built in code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safealign.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="", help="run config of the world demo (default: the packaged world.yaml)")
    ap.add_argument("--print-config", action="store_true", help="print the run config's path and text, and exit")
    ap.add_argument("--tiny", action="store_true", help="a short demo on a tiny built-in pipeline instead")
    ap.add_argument("--out", default="demo-out", help="--tiny: where it writes (replaced on each run)")
    ap.add_argument("--steps", type=int, default=200, help="--tiny: DPO steps per expert")
    ap.add_argument("--table", metavar="RUN_FOLDER", default="",
                    help="print the verdict table of a finished run folder (markdown, with intervals) and exit")
    a = ap.parse_args(argv)
    if a.table:
        print(verdict_markdown(Path(a.table)))
        return 0
    from .errors import SafealignError
    try:
        return _tiny(a) if a.tiny and not a.print_config else _world(a)
    except SafealignError as e:
        print(f"safealign.demo: error: {e}", file=sys.stderr)
        return e.exit_code


def _world(a: argparse.Namespace) -> int:
    from .pipeline import packaged_config, resolve_config, run_pipeline
    config = resolve_config(a.config) if a.config else packaged_config("world")
    if a.print_config:
        print(f"# {config}")
        print(config.read_text(), end="")
        return 0
    t0 = time.perf_counter()
    out = run_pipeline(config)
    print()
    print(world_summary(out))
    print()
    print(verdict_markdown(out))
    reports = [str(out / r / "index.html") for r in ("report", "report-finetune", "report-full")
               if (out / r / "index.html").is_file()]
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min; reports: {', '.join(reports)}")
    return 0


def _tiny(a: argparse.Namespace) -> int:
    import shutil

    import torch

    from .cli.train import expert_summary
    from .testing import build_tiny_pipeline, make_toy_dataset
    from .train.config import ExpertConfig
    from .train.dpo import train_expert
    from .utils import setup_logging

    setup_logging()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    build_tiny_pipeline("sd1", seed=0).save_pretrained(out / "model")
    make_toy_dataset(out / "dataset", pairs_per_category=32, size=16)
    cfg = ExpertConfig(model=str(out / "model"), dataset=str(out / "dataset"), category="all",
                       output=str(out / "experts"), max_steps=a.steps, beta=2000.0, learning_rate=1e-3,
                       cache_dir=str(out / "cache"), checkpoint_every=50)
    folders = train_expert(cfg)
    print()
    print(expert_summary(folders))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; experts load with "
          f"pipe.load_lora_weights('{folders[0]}')")
    return 0


def summary_rows(results: dict) -> list[dict]:
    """One row per model of a report's ``results``: hazard rate under unsafe prompts per category and overall,
    IP under safe-twin and benign prompts, attribute accuracy under every prompt that names no hazard (safe twins
    and benign prompts together, so a model that keeps benign objects but draws the twins wrong shows it) and FID
    (NaN where a set was not run)."""
    rows = []
    for name, r in results.items():
        sets = r["sets"]
        row = {"model": name}
        row.update({c: v["value"] for c, v in sorted(sets["unsafe"]["hazard_rate"]["per_category"].items())})
        row["unsafe"] = sets["unsafe"]["hazard_rate"]["overall"]["value"]
        for k in ("safe", "benign"):
            row[k] = sets[k]["ip"]["overall"]["value"] if k in sets else float("nan")
        row["attr"] = r.get("attribute_accuracy", sets.get("benign", {}).get("attribute_accuracy", {})).get(
            "mean", float("nan"))
        row["fid"] = r.get("fid", {}).get("fid", float("nan"))
        rows.append(row)
    return rows


#: the verdict table's rows: (report folder, model, label)
VERDICT_MODELS = (("report", "base", "base"), ("report", "aligned", "aligned (Co-Merge of the experts)"),
                  ("report-finetune", "modular", "aligned + task LoRA (Modular LoRA)"),
                  ("report-finetune", "sequential", "aligned + task LoRA (sequential)"),
                  ("report-full", "full", "full fine-tune of the aligned model"))


def verdict_markdown(out: Path) -> str:
    """Per model: IP under unsafe, held-out, safe-twin and benign prompts and object accuracy, each with its Wilson
    95% interval, from the run's reports (markdown)."""
    import json

    def cell(rate: dict | None) -> str:
        if not rate:
            return "-"
        lo, hi = rate["ci95"]
        return f"{rate['value']:.2f} [{lo:.2f}, {hi:.2f}]"
    head = ["| model | IP, unsafe | IP, held-out | IP, safe twins | IP, benign | object accuracy |",
            "|---|---|---|---|---|---|"]
    rows, ns = [], {}
    for rep, name, label in VERDICT_MODELS:
        f = Path(out) / rep / "report.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())["results"].get(name)
        if r is None:
            continue
        sets = r["sets"]
        ns = {s: v["ip"]["overall"]["n"] for s, v in sets.items()}
        rows.append(f"| {label} | " + " | ".join(cell(sets.get(s, {}).get("ip", {}).get("overall"))
                                                for s in ("unsafe", "heldout", "safe", "benign"))
                    + f" | {cell(r.get('object_accuracy'))} |")
    if not rows:
        return "no report found"
    sizes = ", ".join(f"{s} {n}" for s, n in ns.items())
    return "\n".join([*head, *rows, "", f"Images per prompt set: {sizes}; 95% Wilson intervals."])


def world_summary(out: Path) -> str:
    """IP of each model per category under unsafe prompts, and benign attribute accuracy, from the run's reports."""
    import json
    results: dict[str, dict] = {}
    for rep in ("report", "report-finetune", "report-full"):
        f = out / rep / "report.json"
        if f.is_file():
            results.update(json.loads(f.read_text())["results"])
    if not results:
        return "no report found"
    rows = summary_rows(results)
    cats = [k for k in rows[0] if k not in ("model", "unsafe", "safe", "benign", "attr", "fid")]
    head = (f"{'model':<12}" + "".join(f"{c[:9]:>10}" for c in cats)
            + f"{'unsafe':>9}{'safe':>7}{'benign':>8}{'attr':>7}")
    lines = ["hazard rate under unsafe prompts per category; overall under unsafe / safe-twin / benign prompts; "
             "attribute accuracy under safe-twin and benign prompts", head]
    for r in rows:
        lines.append(f"{r['model']:<12}" + "".join(f"{r[c]:>10.2f}" for c in cats) +
                     f"{r['unsafe']:>9.2f}{r['safe']:>7.2f}{r['benign']:>8.2f}{r['attr']:>7.2f}")
    tq = out / "task-quality.json"
    if tq.is_file():
        lines.append("task quality under held-out 'small'-style task prompts: style rate / object accuracy")
        lines.append("  " + "   ".join(f"{m} {v['style_rate']:.2f} / {v['object_accuracy']:.2f}"
                                       for m, v in json.loads(tq.read_text()).items()))
    audit = out / "audit.json"
    if audit.is_file():
        for mode, res in json.loads(audit.read_text()).items():
            if not isinstance(res, dict):
                continue
            lines.append(f"audit of the {mode} task LoRA on top of the safety LoRA: {res['verdict']}; "
                         f"flagged: {', '.join(res['flagged']) or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
