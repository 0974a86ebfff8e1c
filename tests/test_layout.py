"""The package's shape: the mini world is a plugin, imports form no cycle, modules and functions stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "safealign"
#: the registries: the only modules outside world/ that may name the world's package
REGISTRIES = {"safealign.plugins", "safealign.judges.registry"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every safealign module ``name`` imports, at module level or inside functions, relative imports resolved;
    ``from pkg import x`` counts as an import of ``pkg.x`` when that is a module."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m == "safealign" or m.startswith("safealign.")}


GRAPH = {name: {m for m in _imports(name, p) if m in MODULES and m != name} for name, p in MODULES.items()}


def test_only_the_registries_import_the_world():
    offenders = sorted(f"{name} imports {m}" for name, deps in GRAPH.items()
                       if not name.startswith("safealign.world") and name not in REGISTRIES
                       for m in deps if m == "safealign.world" or m.startswith("safealign.world."))
    assert not offenders, "the core reaches the mini world only through the registries:\n" + "\n".join(offenders)


def test_import_graph_has_no_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from .errors import SafealignError\n    import safealign.utils\n")
    assert _imports("safealign.m", p) == {"safealign.errors", "safealign.utils"}


def test_no_module_over_500_lines_and_no_function_over_80():
    long_files = [f"{p.relative_to(SRC)}: {n}" for p in MODULES.values()
                  if (n := len(p.read_text().splitlines())) > 500]
    long_funcs = []
    for p in MODULES.values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long_funcs.append(f"{p.relative_to(SRC)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files and not long_funcs, "\n".join(long_files + long_funcs)


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch):
    import safealign.cli as cli
    monkeypatch.setattr(cli, "_COMMAND_MODULES", cli._COMMAND_MODULES + ("safealign.cli.no_such_module",))
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()
