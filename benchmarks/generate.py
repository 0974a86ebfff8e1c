"""Paired image generation: batched (several pairs per pipeline call, per-image generators) against one image per
call, on the same prompts and seeds, plus the whole `data images` step (PNG writing and bookkeeping included).

Runs on the shipped world pipeline when it is built, else on the tiny sd1 pipeline built in code. The batched
images are checked to equal the one-at-a-time ones (per-image generators make the result batch-invariant).

    python benchmarks/generate.py --quick      # 16 pairs, < 3 min on 2 cores
    python benchmarks/generate.py              # 64 pairs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402


def _model(tmp: Path, which: str) -> tuple[str, str]:
    if which not in ("auto", "world", "tiny"):
        return Path(which).name, which  # a pipeline folder
    if which in ("auto", "world"):
        try:
            from safealign.world import pipeline_path
            return "world", str(pipeline_path())
        except Exception:  # noqa: BLE001 - not built: fall back to the tiny pipeline
            if which == "world":
                raise
    from safealign.testing import build_tiny_pipeline
    build_tiny_pipeline("sd1", seed=0).save_pretrained(tmp / "tiny")
    return "tiny-sd1", str(tmp / "tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 pairs (< 3 min on 2 cores)")
    ap.add_argument("--model", default="auto", help="auto (world if built, else tiny), world, tiny, or a folder")
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per pipeline call when batched")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=0, help="sampler steps (default: the world's own; tiny: 10)")
    a = ap.parse_args()
    import diffusers
    import torch
    torch.set_num_threads(a.threads)
    diffusers.utils.logging.set_verbosity_error()
    from safealign.backbone import load_backbone
    from safealign.data.config import ImagesConfig, PromptsConfig
    from safealign.data.images import generate_images, render_pairs, sampling_settings
    from safealign.data.prompts import make_prompts, read_prompts
    from safealign.utils import set_progress
    set_progress(False)

    n_pairs = 16 if a.quick else 64
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        name, model = _model(tmp, a.model)
        per_concept = -(-n_pairs // 21)
        make_prompts(PromptsConfig(output=str(tmp / "p.parquet"), model="world", pairs_per_concept=per_concept))
        df = read_prompts(tmp / "p.parquet").groupby("category", sort=False).head(-(-n_pairs // 7)).head(n_pairs)
        df = df.reset_index(drop=True)
        df.to_parquet(tmp / "sel.parquet", index=False)
        bb = load_backbone(model)
        steps = a.steps or (0 if name != "tiny-sd1" else 10)
        cfg = ImagesConfig(prompts=str(tmp / "sel.parquet"), model=model, output=str(tmp / "ds"),
                           batch_size=a.batch_size, steps=steps)
        settings = sampling_settings(bb, cfg)
        u, s, seeds = df["unsafe_prompt"].tolist(), df["safe_prompt"].tolist(), df["seed"].tolist()
        render_pairs(bb.pipe, u[:2], s[:2], seeds[:2], settings)  # warm-up

        t0 = time.perf_counter()
        one = [render_pairs(bb.pipe, [p], [q], [k], settings) for p, q, k in zip(u, s, seeds)]
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        batched = [render_pairs(bb.pipe, u[i:i + a.batch_size], s[i:i + a.batch_size], seeds[i:i + a.batch_size],
                                settings) for i in range(0, len(u), a.batch_size)]
        t_batch = time.perf_counter() - t0
        one_u = [np.asarray(x[0][0], dtype=np.int16) for x in one]
        b_u = [np.asarray(im, dtype=np.int16) for b in batched for im in b[0]]
        max_diff = int(max(np.abs(x - y).max() for x, y in zip(one_u, b_u)))
        # one image per call: the unsafe and the safe prompt of a pair in separate calls
        t0 = time.perf_counter()
        for p, q, k in zip(u, s, seeds):
            for prompt in (p, q):
                g = [torch.Generator("cpu").manual_seed(int(k))]
                bb.pipe([prompt], num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                        height=settings["height"], width=settings["width"], generator=g, output_type="pil")
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        generate_images(cfg, backbone=bb)
        t_step = time.perf_counter() - t0

    n_img = 2 * len(df)
    rows = [
        {"mode": "one image per call", "model": name, "images": n_img, "batch (pairs)": "-",
         "seconds": t_single, "images/s": n_img / t_single, "speedup": 1.0},
        {"mode": "one pair per call", "model": name, "images": n_img, "batch (pairs)": 1,
         "seconds": t_one, "images/s": n_img / t_one, "speedup": t_single / t_one},
        {"mode": "batched", "model": name, "images": n_img, "batch (pairs)": a.batch_size,
         "seconds": t_batch, "images/s": n_img / t_batch, "speedup": t_single / t_batch},
        {"mode": "data images (end to end)", "model": name, "images": n_img, "batch (pairs)": a.batch_size,
         "seconds": t_step, "images/s": n_img / t_step, "speedup": t_single / t_step},
    ]
    cols = ["mode", "model", "images", "batch (pairs)", "seconds", "images/s", "speedup"]
    print(table(rows, cols))
    print(f"batched vs one pair per call: max pixel difference {max_diff} (0: batch-invariant)")
    p = write_json("generate" + ("_quick" if a.quick else ""),
                   {"rows": rows, "settings": settings, "max_pixel_diff_batched_vs_single": max_diff,
                    "threads": a.threads})
    print(f"results: {p}")
    print(f"generate_speedup: {t_single / t_batch:.2f}")


if __name__ == "__main__":
    main()
