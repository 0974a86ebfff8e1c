"""`safealign evaluate`: thin CLI over :func:`safealign.evaluate.evaluator.evaluate`."""

from __future__ import annotations

from ..configuration import add_arguments, build
from ..evaluate.config import EvaluateConfig


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="judges, IP per category, FID/KID, CLIP score, attacks, HTML report",
                       description="Evaluate a base model and LoRA sets on the same prompts and seeds: IP per "
                                   "category with 95% intervals, FID/KID, attribute accuracy or CLIP score, "
                                   "attack success rates; writes report.json and index.html.")
    p.add_argument("--config", help="YAML file with any of the options below (flags win)")
    add_arguments(p, EvaluateConfig, skip=("lora",))
    p.add_argument("--lora", dest="lora", action="append", default=None, metavar="NAME=PATH[+PATH]",
                   help="a LoRA set to compare with the base: NAME=PATH, or NAME=PATH1+PATH2 to compose "
                        "(repeatable)")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from ..evaluate.evaluator import evaluate, summary
    print(summary(evaluate(build(EvaluateConfig, args))))
    return 0
