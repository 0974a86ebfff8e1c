"""Inference cost of Modular LoRA composition: base, base+safety+task unfused (adapters), and fused.

Fused LoRAs are folded into the weights, so the target is fused <= 1.02x base; unfused adapters add two small
matmuls per targeted layer. Runs on the mini world if its weights are built, else on the tiny SD1 pipeline.

    python benchmarks/compose.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("SAFEALIGN_NO_PROGRESS", "1")
    import torch

    from safealign.backbone import load_backbone
    from safealign.lora import LoraSpec, add_lora, lora_state_dict, save_lora
    from safealign.modular.compose import Part, apply
    from safealign.testing import build_tiny_pipeline

    try:
        from safealign.world import pipeline_path
        model = str(pipeline_path())
        label = "world"
    except Exception:  # noqa: BLE001 - world not built: fall back to the tiny pipeline
        tmp = Path(tempfile.mkdtemp())
        build_tiny_pipeline("sd1").save_pretrained(tmp / "tiny")
        model, label = str(tmp / "tiny"), "tiny sd1"
    work = Path(tempfile.mkdtemp())
    paths = []
    for i, name in enumerate(("safety", "task")):
        bb = load_backbone(model)
        spec = LoraSpec(rank=8 if name == "safety" else 4, alpha=4.0)
        torch.manual_seed(i)
        add_lora(bb.unet, spec)
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.01)
        (work / name).mkdir()
        save_lora(work / name, lora_state_dict(bb.unet), spec)
        paths.append(str(work / name))
    n_images, steps = (16, 10) if a.quick else (64, 20)
    reps = 3 if a.quick else 5
    prompts = ["a red knife on a blue background"] * n_images

    def timed(pipe) -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(n_images)]
        pipe(prompts[:2], num_inference_steps=2, output_type="np")  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pipe(prompts, num_inference_steps=steps, generator=gens, output_type="np")
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    parts = [Part("safety", paths[0], 1.0), Part("task0", paths[1], 1.0)]
    base = load_backbone(model).pipe
    base.set_progress_bar_config(disable=True)
    res = {"base": timed(base)}
    un = apply(load_backbone(model), parts, fuse=False)
    un.set_progress_bar_config(disable=True)
    res["composed-unfused"] = timed(un)
    fu = apply(load_backbone(model), parts, fuse=True)
    fu.set_progress_bar_config(disable=True)
    res["composed-fused"] = timed(fu)
    rows = [{"config": k, "model": label, "images": n_images, "steps": steps, "seconds": v,
             "vs base": v / res["base"]} for k, v in res.items()]
    print(table(rows, ["config", "model", "images", "steps", "seconds", "vs base"]))
    p = write_json("compose" + ("_quick" if a.quick else ""), {"rows": rows, "target": "fused <= 1.02x base"})
    print(f"results: {p}")
    print(f"fused_overhead: {res['composed-fused'] / res['base']:.3f}")


if __name__ == "__main__":
    main()
