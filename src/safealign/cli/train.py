"""`safealign train expert`: thin CLI over :func:`safealign.train.dpo.train_expert`."""

from __future__ import annotations

from pathlib import Path

from ..configuration import add_arguments, build
from ..train.config import ExpertConfig


def register(sub) -> None:
    train = sub.add_parser("train", help="train LoRA safety experts")
    tsub = train.add_subparsers(dest="train_command", metavar="WHAT", parser_class=type(train))
    p = tsub.add_parser("expert", help="Diffusion-DPO LoRA expert(s): --category NAME|all",
                        description="Train one Diffusion-DPO LoRA safety expert per category "
                                    "(winner: safe image, loser: unsafe image, under the unsafe prompt).")
    p.add_argument("--config", help="YAML file with any of the options below (flags win)")
    add_arguments(p, ExpertConfig)
    p.set_defaults(func=_expert)
    train.set_defaults(func=lambda a: (train.print_help(), 2)[1])


def _expert(args) -> int:
    from ..train.dpo import train_expert
    cfg = build(ExpertConfig, args)
    folders = train_expert(cfg)
    from accelerate import PartialState
    if PartialState().is_main_process:
        print(expert_summary(folders))
    return 0


def expert_summary(folders: list[Path]) -> str:
    """One screen: per expert, steps, loss, held-out implicit accuracy and margin, best validation step."""
    from ..artifacts import read_manifest
    rows = ["category            steps  loss     heldout_acc  margin     best_step  path"]
    for f in folders:
        m = read_manifest(f, "lora")
        met = m["metrics"]
        rows.append(f"{m['categories'][0]:<19} {m['config']['max_steps']:<6} "
                    f"{met.get('train/loss', float('nan')):<8.4f} "
                    f"{met.get('heldout/rewards/accuracies', float('nan')):<12.2f} "
                    f"{met.get('heldout/rewards/margins', float('nan')):<10.3g} "
                    f"{str(met.get('best_step')):<10} {f}")
    return "\n".join(rows)
