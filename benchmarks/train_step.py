"""Diffusion-DPO training step: our trainer's design against the official release's, same data, same run.

ours      one UNet with a LoRA; the reference is the same UNet with the adapter disabled; latents and text
          embeddings cached once (the trainer's own `dpo_errors` and cache); winner+loser in one batched forward.
official  a second frozen UNet copy as the reference; VAE and text encoder run on the pair every step; the same
          LoRA and loss, so only the design differs.

Each (shape, design) runs in a fresh subprocess so peak memory is its own. On CPU peak memory is the process's
peak RSS (resource.getrusage); on CUDA it is torch.cuda.max_memory_allocated. ``unet share`` is the part of a
step spent in UNet compute: the UNet's forward calls (timed by forward hooks) plus the backward pass (all of which
runs through the UNet: the loss is a handful of scalars), over the whole step.

    python benchmarks/train_step.py --quick          # the tiny shape, < 60 s on 2 cores
    python benchmarks/train_step.py --shape sd15     # the published SD 1.5 architecture at 128 px (CPU-sized)
    python benchmarks/train_step.py --shape sdxl     # the published SDXL architecture at 128 px (~40 GB RAM)
    python benchmarks/train_step.py                  # tiny, SD1.5 at 128 px and at its native 512 px
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_memory_mb, run_worker, table, write_json  # noqa: E402

SHAPES = {  # name: (architecture, latent size, batch of pairs, steps timed)
    "tiny": ("tiny", 8, 4, 10),
    "sd15-16": ("sd15", 16, 1, 2),  # SD1.5 at 128 px: the quick stand-in for the full shape
    "sd15": ("sd15", 64, 1, 1),
    "sdxl-16": ("sdxl", 16, 1, 1),  # SDXL at 128 px (two text encoders, 2048-d cross-attention, time ids)
}
#: --shape NAME: the published architecture at a CPU-sized resolution
REDUCED = {"sd15": "sd15-16", "sdxl": "sdxl-16"}


def build(shape: str, device: str):
    """Pipeline components: tiny ones, or the published architecture with random weights (no download)."""
    from safealign.fullsize import build_full_size
    from safealign.testing import build_tiny_pipeline
    kind, lat, _, _ = SHAPES[shape]
    pipe = build_tiny_pipeline("sd1", seed=0) if kind == "tiny" else build_full_size(kind, sample_size=lat)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is None:
            continue
        m.requires_grad_(False)
        m.eval()
    pipe.to(device)
    return pipe


class UnetClock:
    """Seconds spent inside the forward calls of ``unets`` (hooks; synchronised on CUDA)."""

    def __init__(self, unets: list, device: str):
        import torch
        self.total, self._t0 = 0.0, 0.0
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def pre(*_):
            sync()
            self._t0 = time.perf_counter()

        def post(*_):
            sync()
            self.total += time.perf_counter() - self._t0
        for unet in unets:
            unet.register_forward_pre_hook(pre)
            unet.register_forward_hook(post)


def worker(shape: str, design: str, device: str) -> dict:
    import torch

    from safealign.backbone import Backbone, Conditioning, unet_forward
    from safealign.lora import LoraSpec, add_lora
    from safealign.train.config import TrainConfig
    from safealign.train.dpo import dpo_errors
    from safealign.train.engine import build_optimizer
    from safealign.train.losses import diffusion_dpo_loss, per_sample_mse

    torch.manual_seed(0)
    _, lat, bs, steps = SHAPES[shape]
    pipe = build(shape, device)
    bb = Backbone(pipe, "sdxl" if SHAPES[shape][0] == "sdxl" else "sd1", shape)
    res = bb.resolution
    g = torch.Generator().manual_seed(0)
    px_w = torch.rand(bs, 3, res, res, generator=g) * 2 - 1
    px_l = torch.rand(bs, 3, res, res, generator=g) * 2 - 1
    prompts = ["a red knife on a blue background"] * bs
    ref_unet = copy.deepcopy(pipe.unet) if design == "official" else None
    torch.manual_seed(1)
    add_lora(pipe.unet, LoraSpec(rank=4, alpha=4.0))
    opt = build_optimizer([p for p in pipe.unet.parameters() if p.requires_grad],
                          TrainConfig(output="x", learning_rate=1e-5))
    if design == "ours":  # encoded once, as the trainer's cache does
        cached = (bb.encode_images(px_w), bb.encode_images(px_l), bb.encode_prompts(prompts))
        # the trainer needs neither the VAE nor the text encoder once everything is cached
        for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if m is not None:
                m.to("meta")
    clock = UnetClock([pipe.unet] + ([ref_unet] if ref_unet is not None else []), device)
    backward = [0.0]

    def step(i: int) -> float:
        gen = torch.Generator().manual_seed(i)
        if design == "ours":
            errs = dpo_errors(bb, pipe.unet, pipe.unet, cached, gen, adapter=None)
        else:
            lw, ll = bb.encode_images(px_w), bb.encode_images(px_l)
            cond: Conditioning = bb.encode_prompts(prompts)
            noise = torch.randn(lw.shape, generator=gen).to(device)
            t = torch.randint(0, bb.num_train_timesteps, (bs,), generator=gen).to(device)
            lat2, n2, t2 = torch.cat([lw, ll]), torch.cat([noise, noise]), torch.cat([t, t])
            noisy, target, c2 = bb.add_noise(lat2, n2, t2), bb.target(lat2, n2, t2), cond.repeat(2)
            with torch.no_grad():
                ref = per_sample_mse(unet_forward(ref_unet, noisy, t2, c2), target)
            pol = per_sample_mse(unet_forward(pipe.unet, noisy, t2, c2), target)
            errs = (pol[:bs], pol[bs:], ref[:bs], ref[bs:])
        loss, _ = diffusion_dpo_loss(*errs, beta=5000.0)
        tb = time.perf_counter()
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        backward[0] += time.perf_counter() - tb
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step(0)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    clock.total, backward[0] = 0.0, 0.0
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"shape": shape, "design": design, "device": device, "pairs_per_step": bs, "steps": steps,
            "steps_per_s": steps / dt, "peak_mem_mb": peak_memory_mb(device),
            "unet_share": (clock.total + backward[0]) / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny shape only (< 60 s on 2 cores)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--shapes", default="", help=f"comma list of shapes to run ({', '.join(SHAPES)})")
    ap.add_argument("--shape", choices=sorted(REDUCED), default=None,
                    help="only this published architecture, at 128 px (CPU-sized)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--design", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.worker:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        print(json.dumps(worker(a.worker_shape, a.design, device)))
        return
    shapes = ["tiny"] if a.quick else ["tiny", "sd15-16", "sd15"]
    if a.shape:
        shapes = [REDUCED[a.shape]]
    if a.shapes:
        shapes = [x for x in a.shapes.split(",") if x]
    rows = []
    for s in shapes:
        r = {d: run_worker(__file__, ["--worker-shape", s, "--design", d, "--device", device])
             for d in ("official", "ours")}
        rows.append({"shape": s, "device": device, "pairs/step": r["ours"]["pairs_per_step"],
                     "official steps/s": r["official"]["steps_per_s"], "ours steps/s": r["ours"]["steps_per_s"],
                     "speedup": r["ours"]["steps_per_s"] / r["official"]["steps_per_s"],
                     "official peak MB": r["official"]["peak_mem_mb"], "ours peak MB": r["ours"]["peak_mem_mb"],
                     "memory ratio": r["ours"]["peak_mem_mb"] / r["official"]["peak_mem_mb"],
                     "official unet share": r["official"]["unet_share"], "ours unet share": r["ours"]["unet_share"]})
        print(f"measured {s}", file=sys.stderr)
    cols = ["shape", "device", "pairs/step", "official steps/s", "ours steps/s", "speedup", "official peak MB",
            "ours peak MB", "memory ratio", "official unet share", "ours unet share"]
    print(table(rows, cols))
    headline = rows[-1]
    name = ("train_step" + ("_quick" if a.quick else "") + (f"_{a.shape}" if a.shape else "")
            + ("_gpu" if device.startswith("cuda") else ""))
    p = write_json(name, {"rows": rows, "headline_shape": headline["shape"],
                          "target": "at the SD1.5 shape: >= 1.5x steps/s at <= 0.7x peak memory"})
    print(f"results: {p}")
    print(f"train_speedup: {headline['speedup']:.2f}")
    print(f"memory_ratio: {headline['memory ratio']:.2f}")
    print(f"unet_share: {headline['ours unet share']:.2f}")


if __name__ == "__main__":
    main()
