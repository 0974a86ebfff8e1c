"""Benchmark: sampling the mini world on CPU (the headline: 64 images at the default settings).

Compares the shipped default (DPM-Solver++ 2M, few steps, one batched classifier-free-guidance forward) with the
reference design: a 50-step DDIM sampler. Also times the judge on the same 64 images.

    python benchmarks/world.py [--quick] [--threads 2] [--model PATH]

Prints a table, writes benchmarks/results/world.json, last line ``world_sample_64_s: X``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (allocations, oneDNN kernels)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--model", default=None, help="world pipeline folder (default: the shipped one)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "world.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import random

    from diffusers import DDIMScheduler

    from safealign.world import load_judge
    from safealign.world.model import generate, load_pipeline, sampling_defaults
    from safealign.world.scene import HAZARDS, make_pair
    rng = random.Random(0)
    prompts = [make_pair(HAZARDS[i % len(HAZARDS)], rng, held_out=True).unsafe_prompt for i in range(64)]
    pipe_dir, judge_dir = None, None
    if args.model is not None:  # a build folder (pipeline/ + judge/) or its pipeline/ folder
        m = Path(args.model)
        pipe_dir = m / "pipeline" if (m / "pipeline").is_dir() else m
        judge_dir = pipe_dir.parent / "judge"
    pipe = load_pipeline(pipe_dir)
    d = sampling_defaults(pipe_dir)
    repeats = 3 if args.quick else 7
    rows = []

    t_default, ts = _time(lambda: generate(pipe, prompts, seed=0, steps=d["steps"], guidance=d["guidance"]),
                          repeats)
    rows.append({"name": f"default: {type(pipe.scheduler).__name__} {d['steps']} steps, cfg {d['guidance']}",
                 "seconds": t_default, "runs": ts})

    default_sched = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(default_sched.config)
    t_ref, ts = _time(lambda: generate(pipe, prompts, seed=0, steps=50, guidance=d["guidance"]),
                      1 if args.quick else 3)
    rows.append({"name": "reference: DDIMScheduler 50 steps", "seconds": t_ref, "runs": ts})
    pipe.scheduler = default_sched

    images = generate(pipe, prompts, seed=0, steps=d["steps"], guidance=d["guidance"])
    judge = load_judge(judge_dir)
    t_judge, ts = _time(lambda: judge(images), repeats)
    rows.append({"name": "judge on the 64 images", "seconds": t_judge, "runs": ts})

    title = f"world benchmark (64 images, 32x32, {args.threads} threads)"
    print(f"{title:<58} {'median s':>9} {'vs default':>11}")
    for r in rows:
        print(f"{r['name']:<58} {r['seconds']:>9.3f} {r['seconds'] / t_default:>10.2f}x")
    result = {
        "benchmark": "world", "quick": args.quick, "threads": args.threads, "images": 64,
        "sampling": d, "rows": rows, "world_sample_64_s": t_default, "reference_over_default": t_ref / t_default,
        "machine": {"processor": platform.processor() or platform.machine(), "python": sys.version.split()[0],
                    "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"world_sample_64_s: {t_default:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
