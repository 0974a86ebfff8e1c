"""`safealign world build | sample PROMPT | info`: the embedded mini world from the command line."""

from __future__ import annotations

import argparse
import dataclasses
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
    s.set_defaults(func=_sample)

    i = wsub.add_parser("info", help="how the shipped weights were built and their measured quality")
    i.add_argument("--model", default="world", metavar="PATH", help="a world pipeline folder (default: shipped)")
    i.add_argument("--json", action="store_true", help="print the whole safealign.json")
    i.set_defaults(func=_info)


def _pipeline_dir(model: str) -> Path:
    from ..world import pipeline_path
    if model == "world":
        return pipeline_path()
    p = Path(model)
    if p.is_dir() and (p / "pipeline" / "model_index.json").is_file():
        p = p / "pipeline"  # the folder `world build --output` wrote
    if not (p / "model_index.json").is_file():
        raise SafealignError(f"{model} is not a world pipeline folder (no model_index.json); pass the folder "
                             "`safealign world build --output` wrote, or leave --model out")
    return p


def _build(args: argparse.Namespace) -> int:
    from ..world.build import build
    if args.seed < 0:
        raise SafealignError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not out.is_dir():
        raise SafealignError(f"--output {out} exists and is not a folder; choose another path")
    if args.threads < 1:
        raise SafealignError(f"--threads must be >= 1, got {args.threads}")
    if args.unet_steps is not None and args.unet_steps < 1:
        raise SafealignError(f"--unet-steps must be >= 1, got {args.unet_steps}")
    config = None
    if args.unet_steps is not None:
        from ..world.build import WorldConfig
        base = WorldConfig.quick_config(args.seed) if args.quick else WorldConfig(seed=args.seed)
        config = dataclasses.replace(base, threads=args.threads, unet_steps=args.unet_steps)
    # the reused VAE and judge are read into memory first, so DIR may be the folder being replaced
    m = build(out, quick=args.quick, seed=args.seed, threads=args.threads, config=config,
              reuse_vae_judge=args.reuse_vae_judge)
    _print_summary(m, out or "the shipped weights folder")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from ..utils import logger
    from ..world.model import generate, image_grid, load_pipeline, sampling_defaults
    from ..world.scene import parse_prompt
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
    path = _pipeline_dir(args.model)
    d = sampling_defaults(path)
    steps = args.steps or d["steps"]
    guidance = d["guidance"] if args.guidance is None else args.guidance
    parsed = parse_prompt(args.prompt)
    if parsed["object"] is None:
        logger.warning("the prompt names no object the world knows; images will be arbitrary")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = load_pipeline(path)
    imgs = generate(pipe, [args.prompt] * args.n, seed=args.seed, steps=steps, guidance=guidance)
    image_grid(imgs, cols=min(8, args.n), scale=2).save(out)
    print(f"wrote {out}: {args.n} images of {args.prompt!r} ({steps} steps, guidance {guidance}, seeds "
          f"{args.seed}..{args.seed + args.n - 1})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..world import manifest
    m = manifest(_pipeline_dir(args.model))
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    _print_summary(m, _pipeline_dir(args.model))
    return 0


def _print_summary(m: dict, where) -> None:
    met = m.get("metrics", {})
    s = m.get("sampling", {})
    t = m.get("timings_s", {})
    from ..world.scene import CATEGORIES
    cats = CATEGORIES

    def pct(k: str) -> str:
        return f"{100 * met[k]:.1f}%" if k in met else "n/a"
    print(f"mini world at {where}")
    print(f"  built by   : {m.get('command', '?')}  ({m.get('created', '?')}, git {str(m.get('git_hash'))[:10]}, "
          f"{m.get('threads', '?')} threads)")
    print(f"  build time : " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    if m.get("vae_judge_reused"):
        r = m["vae_judge_reused"]
        print(f"  VAE, judge : reused from {r.get('from')} (made by `{r.get('command', '?')}`)")
    if "text/unseen_as_unknown" in met:
        print(f"  unseen words: {met['text/unseen_as_unknown']:.0f} tokens training never saw read as the unknown "
              "token")
    if "text/held_out_object" in met:
        print("  text stage : names the held-out prompt's " + ", ".join(
            f"{a} {pct('text/held_out_' + a)}" for a in ("object", "colour", "background", "position")))
    if m.get("unseen_as_unknown"):
        u = m["unseen_as_unknown"]
        before = u.get("before", {}).get("model/unsafe/hazard_rate")
        print(f"  afterwards : {u.get('tokens', '?')} tokens training never saw read as the unknown token"
              + (f" (unsafe-prompt hazard rate before: {100 * before:.1f}%)" if before is not None else ""))
    print(f"  sampling   : {s.get('scheduler', '?')}, {s.get('steps', '?')} steps, guidance {s.get('guidance', '?')}"
          f", {s.get('resolution', '?')}x{s.get('resolution', '?')}")
    print(f"  judge (held-out renders): " + ", ".join(f"{c} {pct('judge/accuracy/' + c)}" for c in cats))
    print(f"                            " + ", ".join(f"{a} {pct('judge/accuracy/' + a)}"
                                                     for a in ("object", "colour", "background", "position")))
    print(f"  model (held-out phrasings): hazard seen for unsafe prompts {pct('model/unsafe/hazard_rate')}, "
          f"safe twins {pct('model/safe/hazard_rate')}, benign {pct('model/benign/hazard_rate')}")
    print(f"                              attribute accuracy: colour {pct('model/accuracy/colour')}, background "
          f"{pct('model/accuracy/background')}, object {pct('model/accuracy/object')}")
    print(f"  judge on generated images: agrees with the nearest render (object) "
          f"{pct('model/agreement/judge_vs_nearest_render/object')}, (hazard) "
          f"{pct('model/agreement/judge_vs_nearest_render/hazard')}; n={met.get('model/agreement/n', '?')}")
    if "package_size_mb" in met:
        print(f"  weights    : {met['package_size_mb']:.1f} MB (fp16)")
