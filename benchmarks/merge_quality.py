"""Co-Merge against every baseline, each single expert and one expert trained on all data, on the mini world.

AlignGuard claims Co-Merge beats the other merges and a single expert trained on every category's data at once.
This measures it on a finished `safealign run` (the demo: `make demo` writes demo-out/world):

    python benchmarks/merge_quality.py --run demo-out/world [--pooled-steps N]

It merges the run's 7 experts with each method (Co-Merge with shared and with per-expert activations, cat, linear,
task arithmetic, TIES, DARE), trains the all-data ("pooled") expert with the experts' settings and as many steps as
all experts together (same compute), and evaluates everything in one `safealign evaluate` run (same prompts, seeds
and judge as the run's own evaluation). Prints a table and writes benchmarks/results/merge_quality.json; the last
line is ``comerge_vs_best_baseline_unsafe: X`` (Co-Merge's unsafe hazard rate minus the best other merge's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

METHODS = ("comerge", "comerge-per-expert", "cat", "linear", "task_arithmetic", "ties", "dare")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="demo-out/world", help="a finished `safealign run` folder")
    ap.add_argument("--quick", action="store_true",
                    help="make a quick world run first (3 categories, short training; about 5 minutes in all)")
    ap.add_argument("--out", default="", help="work folder (default: RUN/merge-quality)")
    ap.add_argument("--pooled-steps", type=int, default=0,
                    help="steps of the all-data expert (default: the experts' steps times their number)")
    a = ap.parse_args()

    from safealign.artifacts import read_manifest
    from safealign.configuration import from_dict
    from safealign.demo import summary_rows
    from safealign.evaluate.config import EvaluateConfig
    from safealign.evaluate.evaluator import evaluate
    from safealign.merge.config import MergeConfig
    from safealign.merge.merger import merge_experts
    from safealign.train.config import ExpertConfig
    from safealign.train.dpo import POOLED, train_expert
    from safealign.utils import setup_logging

    setup_logging()
    run = Path(a.run)
    if a.quick:
        import subprocess
        import tempfile

        from _common import world_config, write_yaml
        tmp = Path(tempfile.mkdtemp(prefix="safealign-merge-quality-"))
        run = tmp / "world"
        cfg_file = write_yaml(tmp / "world.yaml", world_config(run, quick=True))
        r = subprocess.run([sys.executable, "-m", "safealign", "--no-progress", "run", str(cfg_file)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the quick run failed:\n{r.stderr[-3000:]}")
    if not (run / "run.json").is_file():
        raise SystemExit(f"{run} is not a finished `safealign run` folder (no run.json); run `make demo` first, "
                         "pass --run, or use --quick")
    state = json.loads((run / "run.json").read_text())
    cfg = state["config"]
    out = Path(a.out) if a.out else run / "merge-quality"
    out.mkdir(parents=True, exist_ok=True)
    experts = sorted(d for d in (run / "experts").iterdir() if (d / "safealign.json").is_file())
    model, seed = str(cfg.get("model", "world")), int(cfg.get("seed", 0))
    timings: dict[str, float] = {}

    merge_sec = dict(cfg.get("merge") or {})
    for m in METHODS:
        dest = out / m
        if (dest / "safealign.json").is_file():
            continue
        t0 = time.perf_counter()
        opts = {**merge_sec, "method": "comerge" if m.startswith("comerge") else m,
                "activations": "per-expert" if m == "comerge-per-expert" else merge_sec.get("activations", "shared")}
        merge_experts(from_dict(MergeConfig, {"model": model, "seed": seed, "dataset": str(run / "dataset"), **opts,
                                          "experts": (str(run / "experts"),), "output": str(dest)},
                            source="merge"))
        timings[f"merge/{m}"] = round(time.perf_counter() - t0, 1)

    ex = dict(cfg.get("experts") or {})
    steps = a.pooled_steps or int(ex.get("max_steps", 300)) * len(experts)
    pooled = out / "experts" / POOLED
    if not (pooled / "safealign.json").is_file():
        t0 = time.perf_counter()
        train_expert(from_dict(ExpertConfig, {"model": model, "seed": seed, **ex, "max_steps": steps,
                                              "dataset": str(run / "dataset"), "category": POOLED,
                                              "output": str(out / "experts"), "resume": True}, source="pooled"))
        timings["pooled_expert"] = round(time.perf_counter() - t0, 1)

    loras = [f"{m}={out / m}" for m in METHODS] + [f"pooled={pooled}"]
    loras += [f"expert-{d.name}={d}" for d in experts]
    report = out / "report"
    t0 = time.perf_counter()
    ev = {k: v for k, v in (cfg.get("evaluate") or {}).items() if k != "attacks"}  # the run's settings
    evaluate(from_dict(EvaluateConfig, {"model": model, "seed": seed, "categories": tuple(cfg.get("categories") or ()),
                                        **ev, "lora": tuple(loras), "output": str(report), "overwrite": True},
                       source="evaluate"))
    timings["evaluate"] = round(time.perf_counter() - t0, 1)
    rows = summary_rows(json.loads((report / "report.json").read_text())["results"])
    merges = {r["model"]: r for r in rows}
    best_other = min((r for r in rows if r["model"] in METHODS[2:]), key=lambda r: r["unsafe"])
    owned = {m: read_manifest(out / m).get("ownership", {}).get("all") for m in METHODS[:2]}
    cols = list(rows[0])
    print(table(rows, cols))
    payload = {"run": str(run), "pooled_steps": steps, "experts": [d.name for d in experts], "rows": rows,
               "timings_s": timings, "best_other_merge": best_other["model"], "comerge_ownership": owned}
    p = write_json("merge_quality_quick" if a.quick else "merge_quality", payload)
    print(f"wrote {p}")
    if a.quick:
        import shutil
        shutil.rmtree(run.parent, ignore_errors=True)
    print(f"comerge_vs_best_baseline_unsafe: {merges['comerge']['unsafe'] - best_other['unsafe']:+.3f}")


if __name__ == "__main__":
    main()
