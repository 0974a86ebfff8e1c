"""Frozen, validated configuration dataclasses and their (de)serialisation.

Each stage has one config dataclass. Field help lives in ``metadata={"help": ...}``; the CLI builds its options
from the fields, and ``--config x.yaml`` supplies any of them (command-line flags win).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import SafealignError
from .validate import check_seed


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _where(source: str) -> str:
    return "" if source == "command line" else f"{source}: "


def _bad(name: str, source: str, expects: str, value: Any, hint: str = "") -> SafealignError:
    got = f"{value!r} ({type(value).__name__})" if not isinstance(value, str) else repr(value)
    return SafealignError(f"{_where(source)}{_flag(name)} expects {expects}, got {got}{hint}")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_BOOL_HINT = "; YAML reads true/yes/on as a boolean, write a number"


def _as_bool(name: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(name, source, "bool (true or false)", value)


def _as_number(name: str, base: type, value: Any, source: str) -> int | float:
    """A finite int or float; never a bool, never a silently truncated fraction."""
    expects = "int (a whole number)" if base is int else "float (a finite number)"
    if isinstance(value, bool):
        raise _bad(name, source, expects, value, _BOOL_HINT)
    num: Any = value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            num = int(text) if base is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise _bad(name, source, expects, value) from None
    if not isinstance(num, (int, float)):
        raise _bad(name, source, expects, value)
    if isinstance(num, float) and not math.isfinite(num):
        raise _bad(name, source, expects, value, "; NaN and infinity are not allowed")
    if base is float:
        return float(num)
    if isinstance(num, float) and not num.is_integer():
        raise _bad(name, source, expects, value, f"; write {math.floor(num)} or {math.ceil(num)}")
    return int(num)


def _as_str(name: str, value: Any, source: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(name, source, "str (text)", value, "; quote it in YAML" if isinstance(value, bool) else "")
    text = str(value)
    if any(ord(ch) < 32 and ch not in "\t" for ch in text) or "\x7f" in text:
        raise SafealignError(f"{_where(source)}{_flag(name)} contains a control character (NUL, newline, ...); "
                             "remove it")
    return text


def _scalar(name: str, base: Any, value: Any, source: str) -> Any:
    if base is bool:
        return _as_bool(name, value, source)
    if base in (int, float):
        return _as_number(name, base, value, source)
    if base is str:
        return _as_str(name, value, source)
    return value


def _coerce(name: str, tp: Any, value: Any, source: str = "config") -> Any:
    """``value`` as type ``tp``, strictly: no bool for a number, no fraction for an int, finite numbers, no None
    for a field that is not Optional; errors name the option."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
        origin, args = get_origin(tp), get_args(tp)
    if value is None:
        raise SafealignError(f"{_where(source)}{_flag(name)} cannot be null; give a value or leave the option out "
                             "for its default")
    if origin is Literal:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value not in args:
            hint = "; quote it in YAML (yes/no/on/off read as booleans)" if isinstance(value, bool) else ""
            raise SafealignError(f"{_where(source)}{_flag(name)} must be one of {', '.join(map(str, args))}, "
                                 f"got {value!r}{hint}")
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        elem = args[0] if args and args[0] is not Ellipsis else str
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise SafealignError(f"{_where(source)}{_flag(name)} expects a list (YAML list or comma list), "
                                 f"got {type(value).__name__}")
        return tuple(_scalar(name, elem, v, source) for v in value)
    return _scalar(name, tp, value, source)


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
    kw = {k: _coerce(k, hints[k], v, source) for k, v in data.items()}
    for k in [k for k in kw if k == "seed" and kw[k] is not None]:  # one rule for every stage's seed
        kw[k] = check_seed(kw[k], f"{_where(source)}{_flag(k)}")
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
