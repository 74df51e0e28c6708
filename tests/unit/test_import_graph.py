"""The import graph of src/adaptlab: no cycle and no import that points up a layer, counting imports
inside functions and under TYPE_CHECKING (an import hidden in a function is still an edge).

The layers, lowest first, are LAYERS below; a module may import its own layer and those beneath it.
docs/architecture.md draws the same graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# top-level module or package under adaptlab -> layer; lowest layer first
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core",
        ("errors", "outputs", "hub", "config", "hardware", "models", "quantize", "methods", "artifacts"),
    ),
    (
        "kernels",
        (
            "fused",
            "fused_lora",
            "fused_norm",
            "autocast_linear",
            "frozen_base",
            "cpu_attention",
            "losses",
            "optim_backward",
            "compiling",
            "sampling",
            "transforms",
        ),
    ),
    (
        "training",
        (
            "data",
            "objectives",
            "rundir",
            "distributed",
            "health",
            "run_setup",
            "checkpoint",
            "init_from",
            "train",
        ),
    ),
    ("measuring", ("evaluate", "analysis", "adapters")),
    ("deciding", ("plan", "compare", "report", "findings")),
    ("studies", ("reproduce", "healed", "mitigate", "mitigate_sweep", "decide")),
    ("integrations", ("tracking", "runs_index", "export", "publish", "serve")),
    ("cli", ("cli", "__main__")),
]
LAYER_OF = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "adaptlab").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every adaptlab module `name` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.update(
                f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names
            )
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("adaptlab") and target != name:
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in graph() if m != "adaptlab" and layer(m) is None)
    assert not unplaced, f"place these in LAYERS (and docs/architecture.md): {unplaced}"


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_no_import_points_up_a_layer() -> None:
    upward = [
        f"{m} ({LAYERS[layer(m)][0]}) -> {t} ({LAYERS[layer(t)][0]})"
        for m, targets in sorted(graph().items())
        for t in sorted(targets)
        if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)
    ]
    assert upward == []


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path) -> None:
    # the graph functions on a made-up package: a cycle through a function-level import is found
    edges = {"adaptlab.a": {"adaptlab.b"}, "adaptlab.b": {"adaptlab.a"}, "adaptlab.c": set()}
    assert cycles(edges) == [["adaptlab.a", "adaptlab.b"]]
    pkg = tmp_path / "adaptlab"
    pkg.mkdir()
    (pkg / "models.py").write_text("def f():\n    from adaptlab.train import train\n")
    (pkg / "train.py").write_text("")
    known = {"adaptlab.models": pkg / "models.py", "adaptlab.train": pkg / "train.py"}
    targets = imports_of("adaptlab.models", known["adaptlab.models"], known)
    assert targets == {"adaptlab.train"} and layer("adaptlab.train") > layer("adaptlab.models")
