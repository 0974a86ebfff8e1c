"""`make demo`: the main job end to end on what ships with the package.

Until the mini world's data stage lands, the demo builds a tiny SD1-style pipeline and a small paired dataset in
code and trains one real Diffusion-DPO expert per category on them, then prints the summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safealign.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo-out", help="where the demo writes (replaced on each run)")
    ap.add_argument("--steps", type=int, default=200, help="DPO steps per expert")
    ap.add_argument("--world", action="store_true", help="run configs/world.yaml on the mini world instead")
    a = ap.parse_args(argv)
    if a.world:
        from .run import run
        t0 = time.perf_counter()
        out = run(str(Path(__file__).resolve().parents[2] / "configs" / "world.yaml"))
        print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min; reports: {out / 'report' / 'index.html'}, "
              f"{out / 'report-finetune' / 'index.html'}")
        return 0
    import shutil

    import torch

    from .config import ExpertConfig
    from .tiny import build_tiny_pipeline, make_toy_dataset
    from .train.dpo import expert_summary, train_expert
    from .utils import setup_logging

    setup_logging()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    build_tiny_pipeline("sd1", seed=0).save_pretrained(out / "model")
    make_toy_dataset(out / "dataset", pairs_per_category=32, size=16)
    cfg = ExpertConfig(model=str(out / "model"), dataset=str(out / "dataset"), category="all",
                       output=str(out / "experts"), max_steps=a.steps, beta=2000.0, learning_rate=1e-3,
                       cache_dir=str(out / "cache"), checkpoint_every=50)
    folders = train_expert(cfg)
    print()
    print(expert_summary(folders))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; experts load with "
          f"pipe.load_lora_weights('{folders[0]}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
