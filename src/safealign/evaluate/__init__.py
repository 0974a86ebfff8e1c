"""Evaluation: judges, metrics (IP per category, FID/KID, CLIP score, attribute accuracy), attacks, report.

    from safealign.evaluate import EvaluateConfig, evaluate
    folder = evaluate(EvaluateConfig(model="world", lora=("expert=experts/violence",), output="report"))
"""

from .config import EvaluateConfig

__all__ = ["EvaluateConfig", "evaluate", "Judge", "WorldJudge", "NudeNetJudge", "Q16Judge",
           "ClipZeroShotJudge", "CallableJudge", "load_custom"]


def __getattr__(name: str):  # lazy: torch/diffusers load only when used
    if name == "evaluate":
        from . import evaluator
        return getattr(evaluator, name)
    if name in ("Judge", "WorldJudge", "NudeNetJudge", "Q16Judge", "ClipZeroShotJudge", "CallableJudge",
                "load_custom"):
        from .. import judges
        return getattr(judges, name)
    raise AttributeError(name)
