"""`safealign merge`: thin CLI over :func:`safealign.merge.merger.run_merge`."""

from __future__ import annotations

from ..configuration import add_arguments, build

from ..merge.config import MergeConfig


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge safety experts (Co-Merge, cat, linear, TIES, DARE)",
                       description="Merge LoRA safety experts into one LoRA that diffusers loads.")
    p.add_argument("--config", help="YAML file with any of the options below (flags win)")
    add_arguments(p, MergeConfig)
    p.set_defaults(func=_merge)


def _merge(args) -> int:
    from ..merge.merger import merge_summary, run_merge
    print(merge_summary(run_merge(build(MergeConfig, args))))
    return 0
