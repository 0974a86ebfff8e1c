"""`safealign run CONFIG.yaml [--from STAGE]`: the whole flow, resumable."""

from __future__ import annotations


def register(sub) -> None:
    from ..pipeline.runner import STAGES
    p = sub.add_parser("run", help="the whole flow from a YAML config, stage by stage, resumable",
                       description="dataset -> experts -> Co-Merge -> evaluation -> Modular LoRA fine-tune -> "
                                   "evaluation. Finished stages are skipped; --from redoes a stage and the later ones.")
    p.add_argument("config", help="YAML config (see configs/world.yaml)")
    p.add_argument("--from", dest="from_stage", default="", metavar="STAGE",
                   help=f"redo from this stage: {', '.join(STAGES)}")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..pipeline.runner import run
    out = run(args.config, args.from_stage)
    for rep in ("report", "report-finetune", "report-full"):
        if (out / rep / "index.html").is_file():
            print(f"report: {out / rep / 'index.html'}")
    return 0
