"""The shape of src/adaptlab: no module defines a top-level name twice (the later definition silently
replaces the earlier, and calls meant for the first reach the second), no function over MAX_FUNCTION
lines and no module over MAX_MODULE lines, apart from the exceptions docs/architecture.md lists."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "adaptlab"
MAX_FUNCTION = 80
MAX_MODULE = 500
EXCEPTIONS: dict[str, str] = {
    "plan/planner.py:plan": "24 keyword parameters (the flags of `adaptlab plan`) and their docstring",
}
"""'module.py' or 'module.py:function' -> why it stays longer (docs/architecture.md lists the same)."""


def _modules() -> list[tuple[str, ast.Module, int]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        out.append((str(path.relative_to(SRC)), ast.parse(text), len(text.splitlines())))
    return out


def test_no_top_level_name_is_defined_twice() -> None:
    twice = []
    for name, tree, _ in _modules():
        seen: dict[str, int] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name in seen:
                    twice.append(f"{name}: {node.name} (lines {seen[node.name]} and {node.lineno})")
                seen[node.name] = node.lineno
    assert not twice, twice


def test_functions_and_modules_stay_short() -> None:
    long = []
    for name, tree, lines in _modules():
        if lines > MAX_MODULE and name not in EXCEPTIONS:
            long.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION and f"{name}:{node.name}" not in EXCEPTIONS:
                    long.append(f"{name}:{node.name}: {n} lines")
    assert not long, long
