"""`safealign merge`: thin CLI over :func:`safealign.merge.merger.merge_experts`."""

from __future__ import annotations

from pathlib import Path

from ..configuration import add_arguments, build
from ..merge.config import MergeConfig


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge safety experts (Co-Merge, cat, linear, TIES, DARE)",
                       description="Merge LoRA safety experts into one LoRA that diffusers loads.")
    p.add_argument("--config", help="YAML file with any of the options below (flags win)")
    add_arguments(p, MergeConfig)
    p.set_defaults(func=_merge)


def _merge(args) -> int:
    from ..merge.merger import merge_experts
    print(merge_summary(merge_experts(build(MergeConfig, args))))
    return 0


def merge_summary(folder: Path) -> str:
    from ..artifacts import read_manifest
    m = read_manifest(folder, "lora")
    lines = [f"merged {len(m['categories'])} experts with {m['method']} -> {folder} "
             f"(rank {m['lora']['r']}, {m['metrics'].get('merge_seconds', 0):.1f} s)"]
    own = m.get("ownership")
    if own:
        names = m["categories"]
        lines.append("share of neurons owned, per block:")
        lines.append("block".ljust(16) + "".join(n[:12].rjust(13) for n in names))
        for blk, shares in own.items():
            lines.append(blk.ljust(16) + "".join(f"{shares[n]:13.2f}" for n in names))
    return "\n".join(lines)
