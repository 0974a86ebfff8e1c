"""The user documentation: the generated CLI reference is current, the README is short, nothing narrates history."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from safealign.cli import build_parser
from safealign.cli.reference import markdown

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".toml", ".json", ".cfg", ".ini", ".html", ".csv"}
NARRATION = re.compile(r"\bsessions?[ -][0-9]+|\b(this|last|next|previous|earlier) session\b|\bissue [0-9]+\b",
                       re.IGNORECASE)
SKIPPED_PARTS = (".egg-info", "__pycache__", ".partial")  # build outputs, not documentation
REGENERATE = "python -m safealign.cli.reference > docs/cli.md"


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _all_parsers(child)
    return found


def test_reference_has_every_command_and_option():
    text = markdown()
    parsers = _all_parsers(build_parser())
    assert len(parsers) > 10
    for parser in parsers:
        assert f"`{parser.prog}`" in text, parser.prog
        section = text.split(f"`{parser.prog}`\n", 1)[1]
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue  # hidden on purpose (e.g. a deprecated alias)
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section or f", {flag}" in section, (parser.prog, flag)
    for name in ("world build", "world sample", "world info", "data prompts", "data images", "data import-coprov2",
                 "train expert", "merge", "finetune", "compose", "evaluate", "audit", "run", "lora info",
                 "lora export"):
        assert f"## `safealign {name}`" in text, name


def test_reference_renders_help_defaults_and_choices():
    parser = argparse.ArgumentParser(prog="tool", description="Does a thing.")
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("go", help="go somewhere", description="Goes somewhere far.")
    child.add_argument("--speed", type=int, default=3, help="how fast")
    child.add_argument("--mode", choices=["a", "b"], default="a", metavar="MODE", help="which way")
    child.add_argument("--quiet", action="store_true", help="say less")
    child.add_argument("--width", type=int, default=5, help="columns (default: 5)")
    child.add_argument("target", help="where to")
    text = markdown(parser)
    assert "| `tool go` | go somewhere |" in text
    assert "## `tool go`\n\nGo somewhere.\n\nGoes somewhere far.\n" in text
    assert "usage: tool go [-h] [--speed SPEED] [--mode MODE] [--quiet] [--width WIDTH] target" in text
    assert "- `--speed SPEED`: how fast (default `3`)" in text
    assert "- `--mode MODE`: which way (one of `a`, `b`; default `a`)" in text
    assert "- `--quiet`: say less\n" in text            # a flag's off-state is not a default worth printing
    assert "- `--width WIDTH`: columns (default: 5)\n" in text  # the help already names it: not repeated
    assert "- `target`: where to" in text


def test_cli_reference_is_current():
    path = ROOT / "docs" / "cli.md"
    assert path.is_file(), f"docs/cli.md is missing; run `{REGENERATE}`"
    assert path.read_text(encoding="utf-8") == markdown(), f"docs/cli.md is stale; run `{REGENERATE}`"


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"
    head = "\n".join(lines[:10])
    assert "make demo" in head and "make test" in head
    assert head.index("make demo") < head.index("make test")


def test_narration_pattern():
    word = "session"
    assert NARRATION.search(f"measured in {word} 11")
    assert NARRATION.search(f"as the earlier {word} showed")
    assert NARRATION.search("targets from " + "issue" + " 3")
    assert not NARRATION.search("a training session of 3 steps")
    assert not NARRATION.search("an issue with the 3 experts")


def _documented_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    for folder in ("docs", "configs", "src", "tests"):
        files += [p for p in sorted((ROOT / folder).rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and not any(part.endswith(SKIPPED_PARTS) for part in p.relative_to(ROOT).parts)]
    unique = {p.resolve(): p for p in reversed(files) if p.is_file()}  # configs/ may link into src/
    return sorted(unique.values())


def test_no_history_narration():
    offenders = {}
    for path in _documented_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        hits = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in NARRATION.finditer(text)]
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    report = "\n".join(f"{name} ({len(hits)}): {', '.join(hits[:3])}" for name, hits in sorted(offenders.items()))
    assert not offenders, f"files narrate history (identify work by date and commit instead):\n{report}"
