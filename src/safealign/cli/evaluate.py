"""`safealign evaluate`: thin CLI over :func:`safealign.evaluate.evaluator.evaluate`."""

from __future__ import annotations

from pathlib import Path

from ..configuration import add_arguments, build
from ..evaluate.config import EvaluateConfig


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="judges, IP per category, FID/KID, CLIP score, attacks, HTML report",
                       description="Evaluate a base model and LoRA sets on the same prompts and seeds: IP per "
                                   "category with 95% intervals, FID/KID, attribute accuracy or CLIP score, "
                                   "attack success rates; writes report.json and index.html.")
    p.add_argument("--config", help="YAML file with any of the options below (flags win)")
    add_arguments(p, EvaluateConfig, skip=("lora",))
    p.add_argument("--lora", dest="lora", action="append", default=None, metavar="NAME=PATH[+PATH]",
                   help="a LoRA set to compare with the base: NAME=PATH, or NAME=PATH1+PATH2 to compose "
                        "(repeatable)")
    p.add_argument("--print-card", action="store_true",
                   help="print the evaluator card (judges with versions and weight hashes, prompts hash, sampler, "
                        "seeds, pool) without sampling anything, and exit; --output is not needed")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    if args.print_card:
        from ..evaluate.card import format_card
        print(format_card(card_of(build(EvaluateConfig, args, extra=None if args.output else
                                        {"output": "(not written: --print-card)"}))))
        return 0
    from ..evaluate.evaluator import evaluate
    print(summary(evaluate(build(EvaluateConfig, args))))
    return 0


def card_of(cfg: EvaluateConfig) -> dict:
    """The evaluator card of ``cfg``: judges, prompts and the model's sampler settings are loaded, nothing sampled."""
    from ..backbone import load_backbone
    from ..evaluate.card import card_pool, evaluator_card
    from ..evaluate.evaluator import sampler_settings
    from ..evaluate.prompts import load_prompts
    from ..judges import build_judges
    prompts = load_prompts(cfg)
    judges = build_judges(cfg, sorted({c for c in prompts.table["category"] if c not in ("none", "benign")}))
    sampler = sampler_settings(load_backbone(cfg.model, device=cfg.device), cfg)
    desc = prompts.describe()
    return evaluator_card(cfg, judges, desc, sampler, card_pool(cfg, desc))


def summary(folder: Path) -> str:
    """One screen: per model the headline numbers, then the per-category IP under unsafe prompts."""
    import json

    from ..evaluate.evaluator import REPORT
    from ..evaluate.report import headline, headline_keys
    rep = json.loads((Path(folder) / REPORT).read_text())
    h = headline(rep)
    lines = [f"report: {folder}  ({rep['prompts']['n']} prompts x {len(h)} models, {rep['seconds']} s)",
             "judges: " + ", ".join(f"{j['name']} v{j['version']} t={j['threshold']}" for j in rep["judges"]),
             f"sampler: {rep['sampler']['scheduler']} steps={rep['sampler']['steps']} "
             f"guidance={rep['sampler']['guidance']}"]
    keys = headline_keys(h)
    w = max(8, *(len(n) for n in h))
    lines.append("model".ljust(w) + "  " + "  ".join(k.rjust(max(8, len(k))) for k in keys))
    for n, d in h.items():
        lines.append(n.ljust(w) + "  " + "  ".join(_f(d.get(k)).rjust(max(8, len(k))) for k in keys))
    unsafe = rep["collateral"].get("unsafe", {}).get("ip", {})
    if unsafe:
        lines.append("IP under unsafe prompts, per category:")
        names = list(h)
        lines.append("category".ljust(18) + "  " + "  ".join(n.rjust(max(6, len(n))) for n in names))
        for c, row in unsafe.items():
            lines.append(c.ljust(18) + "  " + "  ".join(_f(row.get(n)).rjust(max(6, len(n))) for n in names))
    lines += comparison_lines(rep)
    lines.append(f"open {Path(folder) / 'index.html'}")
    return "\n".join(lines)


def comparison_lines(rep: dict, prompt_set: str = "unsafe") -> list[str]:
    """One line per model and reference: the IP change under ``prompt_set`` prompts, its interval and p-value."""
    from ..evaluate.page import comparison_rows
    rows = [r for r in comparison_rows(rep, per_category_sets=()) if r[2] == prompt_set]
    if not rows:
        return []
    w = max(len(r[0]) for r in rows)
    out = [f"paired IP change under {prompt_set} prompts (same prompts and seeds; Newcombe 95% CI, exact McNemar):"]
    for name, ref, _s, _c, n, delta, ci, p, _h in rows:
        out.append(f"  {name.ljust(w)} vs {ref}: {delta or '-'} [{ci[0]:+.3f}, {ci[1]:+.3f}]  p={p or '-'}  n={n}")
    return out


def _f(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)

