"""Shared benchmark plumbing: run one measurement in a fresh subprocess (clean peak memory), print a table,
write JSON to benchmarks/results/, end with the headline ``name: value`` line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_worker(script: str, args: list[str], timeout: int = 1800) -> dict:
    env = {**os.environ, "SAFEALIGN_NO_PROGRESS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"benchmark worker failed ({' '.join(args)}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def peak_memory_mb(device: str) -> float:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def machine() -> dict:
    import torch
    d = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
         "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def table(rows: list[dict], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(w[c]) for c in cols), "  ".join("-" * w[c] for c in cols)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return p


def world_config(output: str | Path, quick: bool = False) -> dict:
    """configs/world.yaml (the demo) with another output folder; ``quick``: every stage shrunk to seconds (3
    categories, short training, small evaluations) for the per-stage timing and kill -9 benchmarks."""
    import yaml
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "world.yaml").read_text())
    cfg["output"] = str(output)
    if quick:
        cfg["categories"] = ["violence", "self-harm", "shocking"]
        cfg["prompts"].update(pairs_per_concept=8)
        cfg["dataset"].update(target_kept_per_category=8)
        cfg["experts"].update(max_steps=40, checkpoint_every=10)
        cfg["merge"].update(calibration_per_category=4)
        cfg["evaluate"].update(per_category=4, benign=8, attacks=["ringabell"], attack_prompts=1)
        cfg["task"].update(images=32)
        cfg["finetune"].update(max_steps=30, checkpoint_every=10)
        cfg["audit"].update(prompts_per_category=4, seeds=1)
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
