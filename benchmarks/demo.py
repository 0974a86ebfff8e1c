"""The demo's cost, stage by stage: `safealign run` on the mini world in a fresh folder, timed.

    python benchmarks/demo.py            # the packaged world.yaml, as `make demo` runs it
    python benchmarks/demo.py --quick    # the same flow shrunk (3 categories, short training)

Prints each stage's wall time next to a cost model for 2 CPU cores (see ``estimate_seconds``) scaled to this config,
writes benchmarks/results/demo[_quick].json; the last line is ``demo_minutes: X`` (the whole `safealign run`,
process start to exit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, world_config, write_json, write_yaml  # noqa: E402


def estimate_seconds(cfg: dict) -> dict[str, float]:
    """A cost model for 2 CPU cores: 10 s per 64 pairs generated, 60 s per 300 DPO steps of one expert, 40 s per
    8 evaluation prompts per category and model (base and aligned)."""
    from safealign.plugins import get_plugin
    cats = len(cfg.get("categories") or get_plugin("world").taxonomy().categories)
    kept = cfg["dataset"].get("target_kept_per_category", 32)
    return {"dataset": 10.0 * cats * kept / 64, "experts": 60.0 * cats * cfg["experts"]["max_steps"] / 300,
            "evaluate": 40.0 * 2 * cats * cfg["evaluate"].get("per_category", 8) / 8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the shrunk flow")
    ap.add_argument("--keep", default="", help="run in this folder and keep it (default: a temporary folder)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="safealign-demo-") as tmp:
        root = Path(a.keep) if a.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = world_config(root / "world", quick=a.quick)
        cfg_file = write_yaml(root / "world.yaml", cfg)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "safealign", "run", str(cfg_file)], capture_output=True, text=True)
        total = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"safealign run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        state = json.loads((root / "world" / "run_state.json").read_text())
        from safealign.demo import world_summary
        summary = world_summary(root / "world")
    ref = estimate_seconds(cfg)
    rows = [{"stage": s, "seconds": v["seconds"], "estimate_s": ref.get(s)} for s, v in state.items()]
    rows.append({"stage": "total (incl. start-up)", "seconds": round(total, 1), "estimate_s": None})
    print(table(rows, ["stage", "seconds", "estimate_s"]))
    print(summary)
    p = write_json("demo_quick" if a.quick else "demo", {"quick": a.quick, "stages": rows, "config": cfg,
                                                          "summary": summary})
    print(f"wrote {p}")
    print(f"demo_minutes: {total / 60:.2f}")


if __name__ == "__main__":
    main()
