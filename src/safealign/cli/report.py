"""`safealign aggregate`: results over several training seeds (one report per seed)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("aggregate", help="mean, spread and 95% interval of report figures over training seeds",
                       description="Aggregate the reports of several training seeds of one experiment (same prompts, "
                                   "pool, sampler, judges): per model and figure, mean, standard deviation and a "
                                   "Student-t 95% interval of the mean.")
    p.add_argument("reports", nargs="+", metavar="REPORT", help="report folders (or report.json files), one per seed")
    p.add_argument("--output", default="", help="also write the aggregate as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=_aggregate)


def _aggregate(args) -> int:
    from pathlib import Path

    from ..artifacts import write_json_atomic
    from ..errors import SafealignError
    from ..evaluate.aggregate import aggregate, format_aggregate
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise SafealignError(f"--output {args.output} already exists; choose another file or pass --overwrite")
    agg = aggregate(args.reports)
    print(format_aggregate(agg))
    if args.output:
        write_json_atomic(args.output, agg)
    return 0
