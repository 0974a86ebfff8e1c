"""Frozen, validated configuration dataclasses and their (de)serialisation.

Each stage has one config dataclass. Field help lives in ``metadata={"help": ...}``; the CLI builds its options
from the fields, and ``--config x.yaml`` supplies any of them (command-line flags win).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .errors import SafealignError


def field(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a config dataclass (tuples become lists, paths strings)."""
    def conv(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        return v
    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# options that change how a run is carried out, not what it computes
OPERATIONAL = ("resume", "overwrite", "cache_dir", "log_with", "log_every")


def config_hash(cfg: Any) -> str:
    """Hash of what determines the result (operational options such as --resume excluded)."""
    from .utils import sha256_text
    d = {k: v for k, v in to_dict(cfg).items() if k not in OPERATIONAL}
    return sha256_text(json.dumps(d, sort_keys=True))[:16]


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SafealignError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SafealignError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SafealignError(f"config file {p} must hold a mapping of option: value")
    return data


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if value is None:
        return None
    if origin is Literal:
        if value not in get_args(tp):
            raise SafealignError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, get_args(tp)))}, "
                                 f"got {value!r}")
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(value)
    args = [a for a in get_args(tp) if a is not type(None)]
    base = args[0] if args and origin is not None else tp
    if get_origin(base) is Literal:
        return _coerce(name, base, value)
    if get_origin(base) in (tuple, list):
        return _coerce(name, base, value)
    try:
        if base is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base in (int, float, str, bool):
            return base(value)
    except (TypeError, ValueError):
        raise SafealignError(f"--{name.replace('_', '-')} expects {base.__name__}, got {value!r}") from None
    return value


def _is_value(v: Any, values: tuple) -> bool:
    try:
        return not isinstance(v, bool) and float(v) in values
    except (TypeError, ValueError):
        return False


def translate_deprecated(cls: type, data: dict, source: str = "config") -> dict:
    """Old option names and "use the default" sentinels, mapped to today's with a warning.

    A config class may declare ``RENAMED = {"old": "new"}``, ``DEFAULT_SENTINELS = {"name": (values...)}``
    (values of an option, under its old or new name, that once meant "the default" and now read as None) and
    ``REMOVED = {"old": "why"}`` (options that no longer do anything: accepted, ignored, warned about)."""
    import warnings

    from .utils import logger
    renamed = getattr(cls, "RENAMED", {})
    sentinels = getattr(cls, "DEFAULT_SENTINELS", {})
    removed = getattr(cls, "REMOVED", {})
    if not (set(data) & (set(renamed) | set(sentinels) | set(removed))):
        return data
    out = dict(data)
    for key in [k for k in out if k in removed]:
        msg = f"{source}: option {key} is deprecated and ignored ({removed[key]}); remove it"
        warnings.warn(msg, DeprecationWarning, stacklevel=3)
        logger.warning(msg)
        del out[key]
    for key in [k for k in out if k in sentinels and _is_value(out[k], sentinels[k])]:
        msg = (f"{source}: {key}: {out[key]} meaning 'the model's default' is deprecated; leave the option out "
               "instead")
        warnings.warn(msg, DeprecationWarning, stacklevel=3)
        logger.warning(msg)
        out[key] = None
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise SafealignError(f"{source} sets both {old} (deprecated) and {new}; keep only {new}")
        msg = f"{source}: option {old} is deprecated; use {new}"
        warnings.warn(msg, DeprecationWarning, stacklevel=3)
        logger.warning(msg)
        out[new] = out.pop(old)
    return out


def from_dict(cls: type, data: dict, *, source: str = "config") -> Any:
    """Build ``cls`` from a dict, coercing types; unknown keys are an error naming them."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = translate_deprecated(cls, data, source)
    unknown = sorted(set(data) - names)
    if unknown:
        raise SafealignError(f"{source} has unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
    kw = {k: _coerce(k, hints[k], v) for k, v in data.items()}
    return cls(**kw)


def add_arguments(parser: Any, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--option`` per dataclass field (defaults left as None so YAML and defaults can apply)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, "") else "")
        args = [a for a in get_args(tp) if a is not type(None)]
        is_bool = tp is bool or (args and args[0] is bool and len(args) == 1)
        if is_bool:
            parser.add_argument(flag, dest=f.name, default=None, action="store_true", help=help_text)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help="disable " + flag)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text,
                                metavar=f.metadata.get("metavar", f.name.upper()))
    import argparse
    for old in (*getattr(cls, "RENAMED", {}), *getattr(cls, "REMOVED", {})):  # deprecated flags still parse
        parser.add_argument("--" + old.replace("_", "-"), dest=old, default=None, help=argparse.SUPPRESS)


def build(cls: type, args: Any, extra: dict | None = None) -> Any:
    """Config from defaults < ``--config`` YAML < explicit flags < ``extra``."""
    data: dict = {}
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        data.update(load_yaml(cfg_path))
    names = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "RENAMED", {})) \
        | set(getattr(cls, "REMOVED", {}))
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            data[n] = v
    for o, n in getattr(cls, "RENAMED", {}).items():  # a flag under the new name wins over a YAML old key
        if getattr(args, n, None) is not None:
            data.pop(o, None)
    data.update(extra or {})
    return from_dict(cls, data, source=str(cfg_path) if cfg_path else "command line")
