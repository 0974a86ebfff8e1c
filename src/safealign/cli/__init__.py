"""The `safealign` command: one thin subcommand per stage.

Each subcommand builds its config dataclass (flags, or ``--config x.yaml``) and calls one library function.
User errors print one line and exit 2; no traceback. So do filesystem errors (a full disk, a read-only folder, a
file where a folder should be): one line naming the path and what to do; temporary files are gone by then, since
every write is atomic (:mod:`safealign.artifacts`), and the command's output locks are released.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # torchvision-missing notices are noise here
from collections.abc import Callable, Sequence

from ..errors import SafealignError

# modules that contribute subcommands: each has ``register(subparsers)`` setting ``func`` on its parsers
_COMMAND_MODULES = ("safealign.cli.world", "safealign.cli.data", "safealign.cli.train", "safealign.cli.merge",
                    "safealign.cli.evaluate",
                    "safealign.cli.modular", "safealign.cli.run", "safealign.cli.lora",
                    "safealign.cli.report")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(prog="safealign", description="Safety alignment for text-to-image diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _COMMAND_MODULES:  # a command module that fails to import is a bug: let it raise
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..utils import set_progress, setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.no_progress:
        set_progress(False)
    func: Callable | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from ..artifacts import describe_os_error, release_all_outputs
    try:
        return int(func(args) or 0)
    except SafealignError as e:
        print(f"safealign: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the filesystem said no (full disk, read-only, a file where a folder should be...)
        if e.errno is None:  # not a filesystem error (a library's "cannot load" message): a bug to report
            raise
        print(f"safealign: error: {describe_os_error(e, _output_of(args))}", file=sys.stderr)
        return SafealignError.exit_code
    except KeyboardInterrupt:
        print("safealign: interrupted", file=sys.stderr)
        return 130
    finally:
        release_all_outputs()


def _output_of(args: argparse.Namespace) -> str | None:
    """The path a command writes, named in a filesystem error that carries none (a write on a full disk)."""
    for name in ("output", "out", "report"):
        v = getattr(args, name, None)
        if isinstance(v, str) and v:
            return v
    return None


if __name__ == "__main__":
    sys.exit(main())
