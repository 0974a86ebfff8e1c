"""Where `safealign evaluate` spends its time: the whole evaluation (sampling, judging, metrics, intervals, paired
tests, charts, grids, HTML) against the reference design, which only samples the same images (one `generate`
call on the same prompts and seeds: the physical floor of any evaluation).

Reports images judged per second, and the share of the evaluation spent outside the model's sampling
(target: at most 10%). Runs on the shipped world model with its judge.

    python benchmarks/evaluate.py --quick      # 2 prompts per category and set, < 2 min on 2 cores
    python benchmarks/evaluate.py              # 8 prompts per category and set
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-category", type=int, default=0)
    args = ap.parse_args()
    per = args.per_category or (2 if args.quick else 8)
    from safealign.evaluate import EvaluateConfig, evaluate
    from safealign.evaluate.prompts import load_prompts
    from safealign.sampling import SamplingOptions, generate
    from safealign.utils import set_progress
    set_progress(False)
    with tempfile.TemporaryDirectory() as d:
        cfg = EvaluateConfig(model="world", output=str(Path(d) / "report"), per_category=per, benign=2 * per,
                             fid_features="world")
        t0 = time.perf_counter()
        out = evaluate(cfg)
        total = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text())
        # the reference design: sample the same images, nothing else
        from safealign.backbone import load_backbone
        bb = load_backbone("world")
        t = load_prompts(cfg).table
        opts = SamplingOptions(report["sampler"]["steps"], report["sampler"]["guidance"])
        t1 = time.perf_counter()
        generate(bb.pipe, t["prompt"].tolist(), t["seed"].tolist(), opts, batch_size=cfg.batch_size)
        sample_only = time.perf_counter() - t1
    n = report["prompts"]["n"]
    timings = report["timings"]
    overhead = max(0.0, total - timings["sampling"]) / total
    rows = [{"design": "sampling only (reference)", "images": n, "seconds": sample_only,
             "images_per_s": n / sample_only},
            {"design": "safealign evaluate", "images": n, "seconds": total, "images_per_s": n / total,
             "sampling_s": timings["sampling"], "judging_s": timings["judging"], "metrics_s": timings["metrics"]}]
    print(table(rows, ["design", "images", "seconds", "images_per_s", "sampling_s", "judging_s", "metrics_s"]))
    p = write_json("evaluate", {"per_category": per, "rows": rows, "overhead": overhead,
                                "versus_reference": total / sample_only, "target_overhead": 0.10})
    print(f"wrote {p}")
    print(f"images judged per second (whole evaluation): {n / total:.1f}")
    print(f"evaluate_overhead: {overhead:.3f}")


if __name__ == "__main__":
    main()
