"""`safealign run CONFIG [--from STAGE]`: the whole flow, resumable."""

from __future__ import annotations


def register(sub) -> None:
    from ..pipeline import STAGE_NAMES, packaged_configs
    names = ", ".join(packaged_configs())
    p = sub.add_parser("run", help="the whole flow from a YAML config, stage by stage, resumable",
                       description="dataset -> experts -> Co-Merge -> evaluation -> Modular LoRA fine-tune -> "
                                   "evaluation -> audit. Finished stages are skipped; --from redoes a stage and "
                                   "the later ones. The run folder ('output') is relative to the current directory.")
    p.add_argument("config", help=f"YAML run config, or the name of a packaged one ({names}; e.g. "
                                  "`safealign run world` is the demo)")
    p.add_argument("--from", dest="from_stage", default="", metavar="STAGE",
                   help=f"redo from this stage: {', '.join(STAGE_NAMES)}")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..pipeline import run_pipeline
    out = run_pipeline(args.config, args.from_stage)
    for rep in ("report", "report-finetune", "report-full"):
        if (out / rep / "index.html").is_file():
            print(f"report: {out / rep / 'index.html'}")
    return 0
