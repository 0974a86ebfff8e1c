"""The command-line reference in Markdown, generated from the parser itself.

``python -m safealign.cli.reference > docs/cli.md`` regenerates the file; a test fails when it is stale. Usage
lines are formatted at a fixed width, so the text does not depend on the terminal.
"""

from __future__ import annotations

import argparse
import sys

from . import build_parser

_WIDTH = 100
_HEADER = ("# Command-line reference\n\n"
           "Generated from the parser by `python -m safealign.cli.reference > docs/cli.md`; do not edit by hand.\n"
           "Every command prints a one-screen summary and exits 2 on bad input. A command with `--config FILE` reads\n"
           "its options from that YAML file too; flags given on the command line win.\n")


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=_WIDTH)
    text = formatter._expand_help(action) if action.help else ""
    return " ".join(text.split())


def _default(action: argparse.Action, help_text: str) -> str | None:
    """The default worth printing: not None, not a flag's own off-state, not already named by the help."""
    value = action.default
    if value in (None, "") or value is argparse.SUPPRESS or "default" in help_text.lower():
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None
    return str(value)


def _signature(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar
    if metavar is None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    suffix = f" [{metavar} ...]" if action.nargs in ("*", "+") else f" {metavar}"
    return ", ".join(action.option_strings) + suffix


def _option_lines(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue  # help, the subcommand list (sections below) and hidden options
        help_text = _expanded_help(parser, action)
        line = f"- `{_signature(action)}`"
        if help_text:
            line += f": {help_text}"
        extras = []
        if action.required and action.option_strings:
            extras.append("required")
        if action.choices and action.metavar is not None:
            extras.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
        default = _default(action, help_text)
        if default is not None:
            extras.append(f"default `{default}`")
        if extras:
            line += f" ({'; '.join(extras)})"
        lines.append(line)
    return lines


def _section(parser: argparse.ArgumentParser, summary: str | None, level: int, child_level: int) -> list[str]:
    out = [f"{'#' * level} `{parser.prog}`", ""]
    if summary:
        out += [summary[0].upper() + summary[1:] + ("" if summary.endswith(".") else "."), ""]
    if parser.description:
        out += [" ".join(parser.description.split()), ""]
    out += ["```text", _usage(parser), "```", ""]
    options = _option_lines(parser)
    if options:
        out += options + [""]
    subs = _subparsers(parser)
    if subs is not None:
        helps = {a.dest: a.help for a in subs._choices_actions}
        for name, child in subs.choices.items():
            out += _section(child, helps.get(name), child_level, min(child_level + 1, 4))
    return out


def _command_table(parser: argparse.ArgumentParser) -> list[str]:
    subs = _subparsers(parser)
    if subs is None:
        return []
    rows = ["| command | what it does |", "|---|---|"]
    for action in subs._choices_actions:
        cell = (action.help or "").replace("|", r"\|")  # a bare | would end the table cell
        rows.append(f"| `{parser.prog} {action.dest}` | {cell} |")
    return rows + [""]


def markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """Every command and subcommand of ``parser`` (default: the ``safealign`` parser): usage, description, options."""
    parser = parser or build_parser()
    lines = [_HEADER] + _command_table(parser) + _section(parser, "options given before the command", 2, 2)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
