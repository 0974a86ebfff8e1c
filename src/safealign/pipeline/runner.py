"""`safealign run CONFIG.yaml`: the stages of :mod:`.stages` in order, each skipped when already done.

Each stage writes one artifact under the run's ``output`` folder and records its configuration's hash in
``run_state.json`` once the artifact is whole (:mod:`.state`), so a killed run re-run continues where it stopped
(training resumes from its checkpoints; image generation skips written pairs). ``--from STAGE`` redoes that stage
and every later one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..artifacts import write_json_atomic
from ..errors import SafealignError
from .config import RunConfig, load_run_config
from .stages import STAGE_NAMES, STAGES, Stage
from .state import RunState


def _run_stage(stage: Stage, run: RunConfig, state: RunState, redo: bool) -> None:
    cfg = stage.build_config(run)
    artifact = stage.artifact(run)
    settings = {"model": run.model, "seed": run.seed, "categories": run.categories}
    h = state.stage_hash(stage.name, settings, cfg, stage.deps)
    if not redo and state.done(stage.name, h, artifact):
        print(f"[{stage.name}] up to date ({artifact})", flush=True)
        return
    print(f"[{stage.name}] running -> {artifact}", flush=True)
    t0 = time.perf_counter()
    stage.fn(run, cfg, state)
    dt = time.perf_counter() - t0
    state.record(stage.name, h, artifact, dt)
    print(f"[{stage.name}] done in {dt:.0f} s", flush=True)


def preflight(run: RunConfig) -> None:
    """What a run needs that its config alone cannot show, checked before the first stage: the model exists (not
    loaded), the task data exists, the categories are the taxonomy's. Each stage's options were validated when
    the run config was built."""
    from ..backbone import resolve_model
    from ..data.taxonomy import load_taxonomy
    from ..plugins import is_plugin_name
    resolve_model(run.model)
    if run.task.data and not Path(run.task.data).exists():
        raise SafealignError(f"the task section's data {run.task.data} does not exist; pass a captioned image folder "
                             "or leave 'data' out for the model plugin's")
    spec = run.prompts.taxonomy or (run.model if is_plugin_name(run.model) else "")
    if not spec:
        raise SafealignError("the prompts section needs 'taxonomy' (a YAML/CSV file) for a model other than a model "
                             "plugin such as 'world'")
    load_taxonomy(spec).select(run.categories or None)


def run_pipeline(config: str | os.PathLike, from_stage: str = "") -> Path:
    """Run (or continue) the whole flow of a run config (a YAML file, or a packaged config's name); returns the
    run folder. ``from_stage`` redoes that stage and every later one."""
    if from_stage and from_stage not in STAGE_NAMES:
        raise SafealignError(f"--from {from_stage!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
    run = load_run_config(config)
    preflight(run)
    state = RunState(run.out)
    redo_from = STAGE_NAMES.index(from_stage) if from_stage else len(STAGES)
    if from_stage:
        state.start_redo(STAGE_NAMES[redo_from:])
    for i, stage in enumerate(STAGES):
        _run_stage(stage, run, state, redo=i >= redo_from)
    write_json_atomic(run.out / "run.json", {"config": dict(run.raw), "stages": state.state,
                                             "timings_this_run": state.timings})
    return run.out
