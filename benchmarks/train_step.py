"""Diffusion-DPO training step: our trainer's design against the official release's, same data, same run.

ours      one UNet with a LoRA; the reference is the same UNet with the adapter disabled; latents and text
          embeddings cached once (the trainer's own `dpo_errors` and cache); winner+loser in one batched forward.
official  a second frozen UNet copy as the reference; VAE and text encoder run on the pair every step; the same
          LoRA and loss, so only the design differs.

Each (shape, design) runs in a fresh subprocess so peak memory is its own. On CPU peak memory is the process's
peak RSS; on CUDA it is torch.cuda.max_memory_allocated.

    python benchmarks/train_step.py --quick      # tiny + SD1.5 UNet at 16x16 latents, < 3 min on 2 cores
    python benchmarks/train_step.py              # + the SD1.5 shape (random weights, 64x64 latents)
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

SHAPES = {  # name: (unet kind, latent size, batch of pairs, steps timed)
    "tiny": ("tiny", 8, 4, 10),
    "sd15-16": ("sd15", 16, 1, 2),  # SD1.5 UNet at 128px: the quick stand-in for the full shape
    "sd15": ("sd15", 64, 1, 1),
}


def build(shape: str, device: str):
    """Pipeline components: tiny ones, or SD1.5-shaped ones with random weights (no download)."""
    import torch

    from safealign.testing import build_tiny_pipeline, sd15_unet_config
    kind, lat, _, _ = SHAPES[shape]
    pipe = build_tiny_pipeline("sd1", seed=0)
    if kind == "sd15":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel
        torch.manual_seed(0)
        cfg = sd15_unet_config()
        cfg["sample_size"] = lat
        pipe.unet = UNet2DConditionModel(**cfg)
        pipe.vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 sample_size=lat * 8)
        tok = pipe.tokenizer
        tok.model_max_length = 77
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                                         num_hidden_layers=12, num_attention_heads=12,
                                                         max_position_embeddings=77))
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.eval()
    pipe.to(device)
    return pipe


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
    bb = Backbone(pipe, "sd1", shape)
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
        pipe.vae.to("meta")
        pipe.text_encoder.to("meta")

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
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step(0)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"shape": shape, "design": design, "device": device, "pairs_per_step": bs, "steps": steps,
            "steps_per_s": steps / dt, "peak_mem_mb": peak_memory_mb(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny + reduced SD1.5 shape only (< 3 min on 2 cores)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--shapes", default="", help="comma list of shapes to run (tiny, sd15-16, sd15)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--design", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.worker:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        print(json.dumps(worker(a.shape, a.design, device)))
        return
    shapes = ["tiny", "sd15-16"] if a.quick else ["tiny", "sd15-16", "sd15"]
    if a.shapes:
        shapes = [x for x in a.shapes.split(",") if x]
    rows = []
    for s in shapes:
        r = {d: run_worker(__file__, ["--shape", s, "--design", d, "--device", device]) for d in ("official", "ours")}
        rows.append({"shape": s, "device": device, "pairs/step": r["ours"]["pairs_per_step"],
                     "official steps/s": r["official"]["steps_per_s"], "ours steps/s": r["ours"]["steps_per_s"],
                     "speedup": r["ours"]["steps_per_s"] / r["official"]["steps_per_s"],
                     "official peak MB": r["official"]["peak_mem_mb"], "ours peak MB": r["ours"]["peak_mem_mb"],
                     "memory ratio": r["ours"]["peak_mem_mb"] / r["official"]["peak_mem_mb"]})
        print(f"measured {s}", file=sys.stderr)
    cols = ["shape", "device", "pairs/step", "official steps/s", "ours steps/s", "speedup", "official peak MB",
            "ours peak MB", "memory ratio"]
    print(table(rows, cols))
    headline = rows[-1]
    name = "train_step" + ("_quick" if a.quick else "") + ("_gpu" if device.startswith("cuda") else "")
    p = write_json(name, {"rows": rows, "headline_shape": headline["shape"],
                          "target": "at the SD1.5 shape: >= 1.5x steps/s at <= 0.7x peak memory"})
    print(f"results: {p}")
    print(f"train_speedup: {headline['speedup']:.2f}")


if __name__ == "__main__":
    main()
