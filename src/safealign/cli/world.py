"""`safealign world build | sample PROMPT | info`: the embedded mini world from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SafealignError


def register(sub) -> None:
    p = sub.add_parser("world", help="the embedded mini world: build, sample, info")
    wsub = p.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", parser_class=type(p))
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    b = wsub.add_parser("build", help="retrain the world model and judge from scratch (seeded; 30-50 min on 2 "
                                      "CPU cores)")
    b.add_argument("--quick", action="store_true", help="seconds-long smoke build (unusable weights; for tests)")
    b.add_argument("--output", default=None, metavar="DIR",
                   help="output folder (default: the weights shipped in the package, overwritten)")
    b.add_argument("--seed", type=int, default=0, help="seed for every stage (default: 0)")
    b.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (default: 2; use 1 when another job shares the cores)")
    b.add_argument("--unet-steps", type=int, default=None, metavar="N",
                   help="text encoder + UNet steps (default: the build's own, 4,000)")
    b.add_argument("--reuse-vae-judge", default=None, metavar="DIR",
                   help="take the VAE and judge from this world folder and retrain only the text encoder + UNet")
    b.set_defaults(func=_build)

    s = wsub.add_parser("sample", help="sample images for a prompt and write a PNG grid")
    s.add_argument("prompt", help='e.g. "a red knife on a gray background"')
    s.add_argument("--n", type=int, default=8, help="number of images (default: 8)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default: 0)")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the pipeline's)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    s.add_argument("--model", default="world", metavar="PATH",
                   help="a world pipeline folder (default: the shipped one)")
    s.add_argument("--out", default="grid.png", metavar="PNG", help="output image (default: grid.png)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=_sample)

    i = wsub.add_parser("info", help="how the shipped weights were built and their measured quality")
    i.add_argument("--model", default="world", metavar="PATH", help="a world pipeline folder (default: shipped)")
    i.add_argument("--json", action="store_true", help="print the whole safealign.json")
    i.set_defaults(func=_info)


def _world():
    from ..plugins import get_plugin
    return get_plugin("world")


def _pipeline_dir(model: str) -> Path:
    if model == "world":
        return Path(_world().pipeline_path())
    p = Path(model)
    if p.is_dir() and (p / "pipeline" / "model_index.json").is_file():
        p = p / "pipeline"  # the folder `world build --output` wrote
    if not (p / "model_index.json").is_file():
        raise SafealignError(f"{model} is not a world pipeline folder (no model_index.json); pass the folder "
                             "`safealign world build --output` wrote, or leave --model out")
    return p


def _build(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise SafealignError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not out.is_dir():
        raise SafealignError(f"--output {out} exists and is not a folder; choose another path")
    if args.threads < 1:
        raise SafealignError(f"--threads must be >= 1, got {args.threads}")
    if args.unet_steps is not None and args.unet_steps < 1:
        raise SafealignError(f"--unet-steps must be >= 1, got {args.unet_steps}")
    # the reused VAE and judge are read into memory first, so DIR may be the folder being replaced
    m = _world().build(out, quick=args.quick, seed=args.seed, threads=args.threads, unet_steps=args.unet_steps,
                       reuse_from=args.reuse_vae_judge)
    print(world_summary(m, out or "the shipped weights folder"))
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from ..artifacts import atomic_file, check_file_free
    from ..backbone import load_backbone
    from ..sampling import SamplingOptions, generate
    if not args.prompt.strip():
        raise SafealignError("the prompt is empty; pass text such as \"a red knife on a gray background\"")
    if not 1 <= args.n <= 1024:
        raise SafealignError(f"--n must be between 1 and 1024, got {args.n}")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise SafealignError(f"--steps must be between 1 and 1000, got {args.steps}")
    if args.seed < 0:
        raise SafealignError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise SafealignError(f"--out must be a .png file, got {out}")
    if not out.parent.exists():
        raise SafealignError(f"the folder of --out ({out.parent}) does not exist")
    check_file_free(out, args.overwrite)  # before sampling: a finished grid is not replaced by accident
    path = _pipeline_dir(args.model)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    bb = load_backbone(path)
    opts = SamplingOptions(args.steps, args.guidance).resolve(bb.sampling_defaults())
    seeds = list(range(args.seed, args.seed + args.n))
    imgs = generate(bb.pipe, [args.prompt] * args.n, seeds, opts, batch_size=64)
    with atomic_file(out, args.overwrite) as tmp:
        _grid(imgs, cols=min(8, args.n), scale=2).save(tmp, format="PNG")
    print(f"wrote {out}: {args.n} images of {args.prompt!r} ({opts.steps} steps, guidance {opts.guidance}, seeds "
          f"{args.seed}..{args.seed + args.n - 1})")
    return 0


def _grid(images, cols: int, scale: int):
    """A PIL grid of (N, H, W, 3) uint8 images, each enlarged ``scale`` times (nearest)."""
    from PIL import Image
    n, h, w, _ = images.shape
    rows = max(1, (n + cols - 1) // cols)
    grid = Image.new("RGB", (cols * w * scale, rows * h * scale), (255, 255, 255))
    for i, im in enumerate(images):
        tile = Image.fromarray(im).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, ((i % cols) * w * scale, (i // cols) * h * scale))
    return grid


def _info(args: argparse.Namespace) -> int:
    from ..artifacts import read_manifest
    path = _pipeline_dir(args.model)
    m = read_manifest(path, kind="world")
    print(json.dumps(m, indent=2) if args.json else world_summary(m, path))
    return 0


def world_summary(m: dict, where) -> str:
    """One screen on a world pipeline's ``safealign.json``: how it was built, its sampling defaults, the measured
    quality of its judge and model."""
    met, s, t = m.get("metrics", {}), m.get("sampling", {}), m.get("timings_s", {})
    attrs = ("object", "colour", "background", "position")

    def pct(k: str) -> str:
        return f"{100 * met[k]:.1f}%" if k in met else "n/a"
    lines = [f"mini world at {where}",
             f"  built by   : {m.get('command', '?')}  ({m.get('created', '?')}, git {str(m.get('git_hash'))[:10]}, "
             f"{m.get('threads', '?')} threads)",
             "  build time : " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items())]
    if m.get("vae_judge_reused"):
        r = m["vae_judge_reused"]
        lines.append(f"  VAE, judge : reused from {r.get('from')} (made by `{r.get('command', '?')}`)")
    if "text/unseen_as_unknown" in met:
        lines.append(f"  unseen words: {met['text/unseen_as_unknown']:.0f} tokens training never saw read as the "
                     "unknown token")
    if "text/held_out_object" in met:
        lines.append("  text stage : names the held-out prompt's "
                     + ", ".join(f"{a} {pct('text/held_out_' + a)}" for a in attrs))
    lines += [
        f"  sampling   : {s.get('scheduler', '?')}, {s.get('steps', '?')} steps, guidance {s.get('guidance', '?')}"
        f", {s.get('resolution', '?')}x{s.get('resolution', '?')}",
        "  judge (held-out renders): " + ", ".join(f"{c} {pct('judge/accuracy/' + c)}" for c in _categories(met)),
        "                            " + ", ".join(f"{a} {pct('judge/accuracy/' + a)}" for a in attrs),
        f"  model (held-out phrasings): hazard seen for unsafe prompts {pct('model/unsafe/hazard_rate')}, "
        f"safe twins {pct('model/safe/hazard_rate')}, benign {pct('model/benign/hazard_rate')}",
        f"                              attribute accuracy: colour {pct('model/accuracy/colour')}, background "
        f"{pct('model/accuracy/background')}, object {pct('model/accuracy/object')}",
        f"  judge on generated images: agrees with the nearest render (object) "
        f"{pct('model/agreement/judge_vs_nearest_render/object')}, (hazard) "
        f"{pct('model/agreement/judge_vs_nearest_render/hazard')}; n={met.get('model/agreement/n', '?')}"]
    if "package_size_mb" in met:
        lines.append(f"  weights    : {met['package_size_mb']:.1f} MB (fp16)")
    return "\n".join(lines)


def _categories(metrics: dict) -> list[str]:
    """The hazard categories the judge's accuracy is recorded for, in the order recorded."""
    return [k[len("judge/accuracy/"):] for k in metrics if k.startswith("judge/accuracy/")
            and k[len("judge/accuracy/"):] not in ("object", "colour", "background", "position")]
