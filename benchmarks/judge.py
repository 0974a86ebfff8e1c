"""Judge throughput: judged images per second, through the same `safealign.judges` objects the report uses.

world     the mini world's CNN judge (shipped weights; a random judge of the same architecture when the weights are
          not built yet: the cost is the same), 32x32 images, judge batches of 512
nudenet   NudeNet's detector on 256x256 images, one image at a time as its API takes them (if installed; else
          reported as unavailable)
q16       (full run only) Q16's CLIP ViT-L/14 image tower at 224px with random weights (no download), batches of 8

Each judge runs in a fresh subprocess.

    python benchmarks/judge.py --quick      # world (+ NudeNet if installed), < 3 min on 2 cores
    python benchmarks/judge.py              # + the Q16 ViT-L/14 shape
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_worker, table, write_json  # noqa: E402


def _world_judge(device: str):
    import torch

    from safealign.errors import SafealignError
    from safealign.judges import WorldJudge
    try:
        return WorldJudge(), "shipped"
    except SafealignError:
        from safealign.world.judge import Judge, JudgeNet, label_space
        from safealign.world.scene import CATEGORIES
        torch.manual_seed(0)
        d = Path(tempfile.mkdtemp()) / "judge"
        Judge(JudgeNet(CATEGORIES, label_space()), CATEGORIES, label_space()).save(d)
        return WorldJudge(d), "random (weights not built)"


def _time(fn, images, repeats: int) -> float:
    fn(images[: min(len(images), 8)])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(images)
    return repeats * len(images) / (time.perf_counter() - t0)


def worker(judge: str, n: int, device: str) -> dict:
    import numpy as np
    import torch
    rng = np.random.default_rng(0)
    if judge == "world":
        j, weights = _world_judge(device)
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        ips = _time(j, imgs, 3)
        feats = _time(j.features, imgs, 3)
        return {"judge": "world", "weights": weights, "image_size": 32, "images": n, "images_per_s": ips,
                "features_per_s": feats, "version": j.version, "threads": torch.get_num_threads()}
    if judge == "nudenet":
        try:
            from safealign.judges import NudeNetJudge
            j = NudeNetJudge()
        except Exception as e:  # noqa: BLE001 - the optional extra is missing: report, don't fail
            return {"judge": "nudenet", "available": False, "why": str(e)}
        imgs = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
        return {"judge": "nudenet", "available": True, "image_size": 256, "images": n,
                "images_per_s": _time(j, imgs, 1), "version": j.version, "threads": torch.get_num_threads()}
    if judge == "q16":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from safealign.judges import clip_pixels
        torch.manual_seed(0)
        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
        model = CLIPVisionModelWithProjection(cfg).eval().to(device)
        prompts = torch.nn.functional.normalize(torch.randn(2, 768), dim=-1).to(device)
        imgs = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)

        @torch.no_grad()
        def judge_fn(a):
            out = []
            for i in range(0, len(a), 8):
                e = model(pixel_values=clip_pixels(a[i:i + 8], 224).to(device)).image_embeds
                out.append(torch.softmax(100 * torch.nn.functional.normalize(e, dim=-1) @ prompts.T, -1)[:, 1])
            return torch.cat(out)
        return {"judge": "q16 (ViT-L/14 shape, random weights)", "image_size": 224, "images": n,
                "images_per_s": _time(judge_fn, imgs, 1), "threads": torch.get_num_threads()}
    raise SystemExit(f"unknown judge {judge}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="world (+ NudeNet if installed) only, < 3 min on 2 cores")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--judge", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.worker:
        print(json.dumps(worker(a.judge, a.n, device)))
        return
    plan = [("world", 2048 if a.quick else 8192), ("nudenet", 8 if a.quick else 32)]
    if not a.quick:
        plan.append(("q16", 16))
    rows = []
    for judge, n in plan:
        r = run_worker(__file__, ["--judge", judge, "--n", str(n), "--device", device])
        if r.get("available") is False:
            r = {"judge": judge, "images_per_s": None, "note": "unavailable (optional extra not installed)",
                 "why": r["why"]}
        rows.append({**r, "device": device})
        print(f"measured {judge}", file=sys.stderr)
    cols = ["judge", "device", "image_size", "images", "images_per_s", "features_per_s", "weights", "note"]
    print(table(rows, cols))
    name = "judge" + ("_gpu" if device.startswith("cuda") else "")
    p = write_json(name, {"quick": a.quick, "rows": rows})
    print(f"results: {p}")
    print(f"judge_images_per_s: {rows[0]['images_per_s']:.0f}")


if __name__ == "__main__":
    main()
