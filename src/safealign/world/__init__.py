"""The embedded mini world: a tiny text-to-image model and its judge (placeholder until issue 3 lands)."""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"


def pipeline_path() -> Path:
    from ..errors import SafealignError
    p = WEIGHTS / "pipeline"
    if not (p / "model_index.json").is_file():
        raise SafealignError("the mini world's weights are not built; run `safealign world build`")
    return p
