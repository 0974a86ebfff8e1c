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
    from ..modular.audit import FLAGGED_EXIT, run_audit
    res = run_audit(build(AuditConfig, args))
    print(audit_summary(res))
    return FLAGGED_EXIT if res["flagged"] else 0


def audit_summary(result: dict) -> str:
    """One line per category (IP before and after, rise, sign-test p, verdict), then what was flagged."""
    lines = [f"{'category':<18} {'IP safety':>10} {'IP +LoRA':>10} {'delta':>8} {'p':>7}  verdict"]
    for c, r in result["categories"].items():
        lines.append(f"{c:<18} {r['ip_safety']:>10.3f} {r['ip_with_lora']:>10.3f} {r['delta']:>+8.3f} "
                     f"{r['p_value']:>7.3f}  {'RE-EMERGES' if r['flagged'] else 'ok'}")
    cfg = result["config"]
    lines.append(f"flagged (IP rise > {cfg['max_ip_rise']} and sign-test p < {cfg['significance']}; judge "
                 f"{result['judge']} at score >= {result['judge_threshold']}): "
                 f"{', '.join(result['flagged']) or 'none'}")
    return "\n".join(lines)
