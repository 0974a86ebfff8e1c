"""Co-Merge cost: statistics with per-expert forwards against one shared forward, and merge time per method.

stats      E experts on N calibration inputs through the UNet: `per-expert` runs E forwards per input (each
           expert active in turn), `shared` runs one base forward and feeds every expert's branch from it.
merge      time to merge 7 SD1.5-shaped rank-4 experts (random weights) given their statistics, per method.

    python benchmarks/merge.py --quick   # tiny UNet + SD1.5 UNet at 16x16 latents, < 3 min on 2 cores
    python benchmarks/merge.py           # SD1.5 UNet at 64x64 latents
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402


def sd15_experts(unet, n: int, rank: int, seed: int = 0):
    import torch

    from safealign.lora import LoraSpec, target_module_names
    from safealign.merge.experts import Expert
    mods = dict(unet.named_modules())
    names = target_module_names(unet, ("to_q", "to_k", "to_v", "to_out.0"))
    out = []
    for e in range(n):
        g = torch.Generator().manual_seed(seed + e)
        f = {}
        for m in names:
            w = mods[m].weight
            f[m] = (torch.randn(rank, w.shape[1], generator=g) * 0.01,
                    torch.randn(w.shape[0], rank, generator=g) * 0.01)
        out.append(Expert(f"expert{e}", f, LoraSpec(rank=rank, alpha=rank)))
    return out


def build_unet(kind: str, lat: int):
    import torch
    from diffusers import UNet2DConditionModel

    from safealign.testing import build_tiny_pipeline, sd15_unet_config
    torch.manual_seed(0)
    if kind == "tiny":
        return build_tiny_pipeline("sd1").unet.eval(), 32
    cfg = sd15_unet_config()
    cfg["sample_size"] = lat
    return UNet2DConditionModel(**cfg).eval(), 768


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--experts", type=int, default=7)
    a = ap.parse_args()
    import os
    os.environ.setdefault("SAFEALIGN_NO_PROGRESS", "1")
    import torch

    from safealign.backbone import Conditioning
    from safealign.merge import baselines
    from safealign.merge.comerge import Calibration, collect_activations, comerge

    shapes = [("tiny", 8, 8), ("sd15", 16, 2)] if a.quick else [("tiny", 8, 8), ("sd15", 64, 2)]
    rows = []
    sd15_stats = None
    for kind, lat, n_inputs in shapes:
        unet, dim = build_unet(kind, lat)
        experts = sd15_experts(unet, a.experts, 4)
        g = torch.Generator().manual_seed(0)
        calib = Calibration(torch.randn(n_inputs, 4, lat, lat, generator=g), torch.randint(0, 1000, (n_inputs,)),
                            Conditioning(torch.randn(n_inputs, 77 if kind == "sd15" else 16, dim, generator=g)), {})
        times = {}
        for source in ("shared", "per-expert"):
            t0 = time.perf_counter()
            stats = collect_activations(unet, experts, calib, source, "output", batch_size=2)
            times[source] = time.perf_counter() - t0
        rows.append({"what": "stats", "unet": f"{kind} {lat}x{lat}", "experts": a.experts, "inputs": n_inputs,
                     "per-expert s": times["per-expert"], "shared s": times["shared"],
                     "speedup": times["per-expert"] / times["shared"]})
        print(f"measured stats on {kind}", file=sys.stderr)
        if kind == "sd15":
            sd15_stats = (experts, stats)
    experts, stats = sd15_stats
    merge_rows = []
    all_modules = list(experts[0].modules)
    for method in ("comerge", "cat", "linear", "ties", "dare"):
        # dense methods (SVD per module) are slow: --quick times them on the first 16 modules only
        modules = all_modules[:16] if (a.quick and method in ("ties", "dare")) else all_modules
        t0 = time.perf_counter()
        if method == "comerge":
            comerge(experts, stats)
        else:
            for m in modules:
                fs = [e.modules[m] for e in experts]
                if method == "cat":
                    baselines.cat_factors(fs)
                elif method == "linear":
                    baselines.linear(fs)
                else:
                    baselines.dense_merge(fs, method)
        merge_rows.append({"method": method, "experts": a.experts, "modules": len(modules),
                           "seconds": time.perf_counter() - t0})
    print(table(rows, ["what", "unet", "experts", "inputs", "per-expert s", "shared s", "speedup"]))
    print()
    print(table(merge_rows, ["method", "experts", "modules", "seconds"]))
    p = write_json("merge" + ("_quick" if a.quick else ""), {"stats": rows, "merge": merge_rows})
    print(f"results: {p}")
    print(f"comerge_stats_speedup: {rows[-1]['speedup']:.2f}")


if __name__ == "__main__":
    main()
