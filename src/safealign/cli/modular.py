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
    print(finetune(build(FinetuneConfig, args)))
    return 0


def _compose(args) -> int:
    from ..modular.compose import compose
    print(compose(build(ComposeConfig, args)))
    return 0


def _audit(args) -> int:
    from ..modular.audit import run_audit
    return run_audit(build(AuditConfig, args))
