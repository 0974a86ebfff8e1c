"""Kill -9 `safealign run` at random moments; the re-runs must finish with the numbers of an uninterrupted run.

    python benchmarks/kill9.py [--kills 10] [--seed 0] [--full]

1. Runs the quick world flow (benchmarks/_common.py: 3 categories, short training, every stage) uninterrupted.
2. Runs the same config in another folder and SIGKILLs the whole process group at a random moment, `--kills`
   times (each re-run continues from what the killed one left), then lets the last re-run finish.
3. Compares every number of the final reports (report/, report-finetune/, report-full/, audit.json,
   task-quality.json) with the uninterrupted run's, and checks that no temporary folder was left behind.

Prints one row per kill (moment, stage it interrupted) and writes benchmarks/results/kill9.json; the last line is
``kill9_identical: 1`` when every number matches (0 otherwise, and exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, world_config, write_json, write_yaml  # noqa: E402

VOLATILE = {"seconds", "created", "timings_s", "train_seconds", "steps_per_s", "stats_seconds", "merge_seconds",
            "path", "output", "artifact", "git_hash"}


def start(cfg_file: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "SAFEALIGN_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "safealign", "run", str(cfg_file)], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def last_stage(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("[")]
    return lines[-1].split("]")[0].strip("[") if lines else "start-up"


def numbers(run: Path) -> dict:
    """Every result of a finished run, without times, dates and paths."""
    out = {}
    for rep in ("report", "report-finetune", "report-full"):
        f = run / rep / "report.json"
        if f.is_file():
            out[rep] = json.loads(f.read_text())["results"]
    for name in ("audit.json", "task-quality.json"):
        if (run / name).is_file():
            d = json.loads((run / name).read_text())
            out[name] = {k: {kk: vv for kk, vv in v.items() if kk != "config"} for k, v in d.items()}
    return strip(out)


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in VOLATILE}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: missing on one side" for k in set(a) ^ set(b)]
        for k in set(a) & set(b):
            out += diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{path}: {a!r} != {b!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--quick", action="store_true", help="the quick flow (the default; for `make bench`)")
    ap.add_argument("--full", action="store_true", help="the whole demo config instead of the quick one")
    ap.add_argument("--keep", default="", help="work in this folder and keep it")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="safealign-kill9-") as tmp:
        root = Path(a.keep) if a.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ref_cfg = write_yaml(root / "ref.yaml", world_config(root / "ref", quick=not a.full))
        t0 = time.perf_counter()
        p = start(ref_cfg, root / "ref.log")
        if p.wait() != 0:
            raise SystemExit(f"uninterrupted run failed; see {root / 'ref.log'}")
        t_ref = time.perf_counter() - t0
        print(f"uninterrupted run: {t_ref:.0f} s", flush=True)

        cfg = write_yaml(root / "killed.yaml", world_config(root / "killed", quick=not a.full))
        log = root / "killed.log"
        rows = []
        t_chain = time.perf_counter()
        for k in range(a.kills):
            # up to a third of the uninterrupted run: later kills land in later stages, since every re-run
            # continues where the last one stopped
            delay = rng.uniform(1.0, max(2.0, t_ref / 3))
            p = start(cfg, log)
            try:
                p.wait(timeout=delay)
                rows.append({"kill": k + 1, "after_s": round(delay, 1), "stage": "finished before the kill"})
                break
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rows.append({"kill": k + 1, "after_s": round(delay, 1), "stage": last_stage(log)})
                print(f"kill {k + 1}: after {delay:.1f} s in {rows[-1]['stage']}", flush=True)
        p = start(cfg, log)
        rc = p.wait()
        chain = time.perf_counter() - t_chain
        if rc != 0:
            raise SystemExit(f"the re-run after the kills failed (exit {rc}); see {log}")
        problems = diff(numbers(root / "ref"), numbers(root / "killed"))
        leftovers = [str(q.relative_to(root)) for q in (root / "killed").rglob("*")
                     if q.name.startswith(".") and q.is_dir()]
        if leftovers:
            problems.append(f"temporary folders left behind: {', '.join(leftovers[:5])}")
    print(table(rows, ["kill", "after_s", "stage"]))
    kills = sum(1 for r in rows if r["stage"] != "finished before the kill")
    print(f"{kills} kills; uninterrupted {t_ref:.0f} s, killed chain {chain:.0f} s; "
          f"{'every number identical' if not problems else f'{len(problems)} differences'}")
    for d in problems[:20]:
        print("  " + d)
    p = write_json("kill9", {"kills": rows, "uninterrupted_s": round(t_ref, 1), "chain_s": round(chain, 1),
                             "differences": problems, "quick": not a.full})
    print(f"wrote {p}")
    print(f"kill9_identical: {int(not problems)}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
