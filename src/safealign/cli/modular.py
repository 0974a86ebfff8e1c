"""`safealign finetune | compose | audit`: thin CLIs for the Modular LoRA stage."""

from __future__ import annotations

from ..configuration import add_arguments, build
from ..modular.config import AuditConfig, ComposeConfig
from ..train.config import FinetuneConfig


def register(sub) -> None:
    for name, cls, func, help_ in (
            ("finetune", FinetuneConfig, _finetune, "task LoRA (or full) fine-tune: --mode modular|sequential|full"),
            ("compose", ComposeConfig, _compose, "base + safety + task LoRAs -> one LoRA or a fused pipeline"),
            ("audit", AuditConfig, _audit, "does a LoRA bring unsafe concepts back? exit 1 if so")):
        p = sub.add_parser(name, help=help_, description=(cls.__doc__ or "").strip())
        p.add_argument("--config", help="YAML file with any of the options below (flags win)")
        add_arguments(p, cls)
        p.set_defaults(func=func)


def _finetune(args) -> int:
    from ..train.finetune import finetune
    folder = finetune(build(FinetuneConfig, args))
    from accelerate import PartialState
    if PartialState().is_main_process:
        print(folder)
    return 0


def _compose(args) -> int:
    from ..modular.compose import compose
    print(compose(build(ComposeConfig, args)))
    return 0


def _audit(args) -> int:
    from ..modular.audit import exit_code, run_audit
    res = run_audit(build(AuditConfig, args))
    print(audit_summary(res))
    return exit_code(res)


def audit_summary(result: dict) -> str:
    """The plan, one line per test (rates before and after, change with its interval, Holm p, verdict), then the
    verdict."""
    plan, cfg = result["plan"], result["config"]
    lines = [f"plan: {plan['images_per_test']} images per test detect a change of {plan['min_rise']:.2f} with power "
             f"{plan['power']:.2f} ({plan['tests']} tests, Holm); this run: {result['images']['per_configuration']} "
             f"images per configuration",
             f"{'measure':<32} {'safety':>7} {'+LoRA':>7} {'change':>8} {'95% CI':>16} {'n':>5} {'p Holm':>7}  "
             f"verdict"]
    for m, rows in result["measures"].items():
        for k, r in rows.items():
            word = "FLAGGED" if r["flagged"] else ("ok" if r["enough_images"] else "ok (too few images)")
            lines.append(f"{m + '/' + k:<32} {r['safety']['value']:>7.3f} {r['with_lora']['value']:>7.3f} "
                         f"{r['delta']:>+8.3f} [{r['ci95'][0]:>+6.3f}, {r['ci95'][1]:>+6.3f}] "
                         f"{r['safety']['n']:>5} {r['p_holm']:>7.3f}  {word}")
    lines.append(f"verdict: {result['verdict']} (flag: Holm p < {cfg['significance']} and a harmful change > "
                 f"{cfg['max_ip_rise']}; judge {result['judge']} at score >= {result['judge_threshold']}); flagged: "
                 f"{', '.join(result['flagged']) or 'none'}")
    return "\n".join(lines)
