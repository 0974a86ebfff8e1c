"""`safealign run`: the whole flow from one run config, stage by stage, resumable."""

from __future__ import annotations

from .config import RunConfig, load_run_config, packaged_config, packaged_configs, resolve_config, run_config_from_dict
from .runner import run_pipeline
from .stages import STAGE_NAMES, STAGES, Stage

__all__ = ["RunConfig", "STAGES", "STAGE_NAMES", "Stage", "load_run_config", "packaged_config", "packaged_configs",
           "resolve_config", "run_config_from_dict", "run_pipeline"]
