"""`safealign lora info | export`: inspect a LoRA file or convert it for A1111/ComfyUI (kohya keys)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("lora", help="inspect or export LoRA files")
    lsub = p.add_subparsers(dest="lora_command", metavar="WHAT", parser_class=type(p))
    info = lsub.add_parser("info", help="rank, alpha, targets, modules and provenance of a LoRA")
    info.add_argument("path", help="LoRA folder or .safetensors file")
    info.set_defaults(func=_info)
    exp = lsub.add_parser("export", help="write the LoRA in the kohya/webui key format (A1111, ComfyUI)")
    exp.add_argument("path", help="LoRA folder or .safetensors file (diffusers format)")
    exp.add_argument("output", help="destination .safetensors file")
    exp.add_argument("--format", choices=["kohya"], default="kohya")
    exp.add_argument("--overwrite", action="store_true")
    exp.set_defaults(func=_export)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _info(args) -> int:
    from ..artifacts import read_manifest
    from ..lora.io import load_lora, tensor_ranks
    sd, spec = load_lora(args.path)  # the header is checked against the tensors
    ranks = tensor_ranks(sd)  # what the file holds, not what its header claims
    n = sum(v.numel() for v in sd.values())
    lo, hi = min(ranks.values()), max(ranks.values())
    scales = sorted({spec.scale_for(m) for m in ranks})
    rank = f"{lo}" if lo == hi else f"{lo}-{hi} (per module)"
    scale = "-".join(f"{x:g}" for x in dict.fromkeys((scales[0], scales[-1])))
    print(f"rank {rank}, alpha {spec.alpha:g} (scale {scale}), targets {','.join(spec.targets)}")
    print(f"{len(ranks)} modules, {n:,} parameters")
    folder = Path(args.path) if Path(args.path).is_dir() else Path(args.path).parent
    m = read_manifest(folder, required=False)
    if m:
        print(f"safealign {m.get('kind')} role={m.get('role')} categories={m.get('categories')} "
              f"base={(m.get('base_model') or {}).get('source')}")
    return 0


def _export(args) -> int:
    from ..errors import SafealignError
    from ..lora import export_kohya
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SafealignError(f"{out} already exists; choose another path or pass --overwrite")
    print(export_kohya(args.path, out))
    return 0
