"""The import graph between adaptlab's top-level modules and folders, as the code is today.

Every `import adaptlab.X` / `from adaptlab.X import ...` / relative import in src/adaptlab is counted,
at module level and inside functions alike, and folded onto its top-level node (a module such as
`train`, or a folder such as `compare/`). Prints the edges, the cycles (strongly connected components
of more than one node) and, for each edge, which layer of docs/architecture.md it goes from and to.

    python docs/import_graph.py            # from the repository root
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "adaptlab"

# the layer each top-level node belongs to, lowest first (docs/architecture.md, "Layers")
LAYERS: dict[str, list[str]] = {
    "core": ["errors", "hub", "config", "hardware", "models", "methods", "quantize", "artifacts", "outputs",
             "rundir"],
    "kernels": ["losses", "fused", "fused_lora", "fused_norm", "frozen_base", "autocast_linear",
                "cpu_attention", "compiling", "optim_backward", "sampling"],
    "training": ["data/", "objectives/", "checkpoint", "health", "distributed", "train", "init_from"],
    "measuring": ["evaluate/", "analysis", "mitigate", "mitigate_sweep"],
    "deciding": ["plan/", "compare/", "report/"],
    "studies": ["healed", "reproduce"],
    "outputs": ["adapters", "tracking", "runs_index", "export", "publish", "serve/"],
    "cli": ["cli/", "__main__"],
}  # fmt: skip
RANK = {node: i for i, nodes in enumerate(LAYERS.values()) for node in nodes}
LAYER_OF = {node: layer for layer, nodes in LAYERS.items() for node in nodes}


def node_of(parts: list[str]) -> str:
    """The top-level node of a module path below adaptlab (['compare', 'runner'] -> 'compare/')."""
    head = parts[0]
    return f"{head}/" if (ROOT / head).is_dir() else head


# how an import is made, strongest first: at module level, only inside functions, only for type checkers
KINDS = ("module", "function", "types")


def imports_of(path: Path) -> dict[str, str]:
    """The top-level adaptlab nodes that one file imports, anywhere in it, each with its strongest kind."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(), str(path))

    def inside(nodes: list[ast.AST]) -> set[int]:
        return {id(n) for top in nodes for n in ast.walk(top)}

    in_function = inside(
        [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    )
    for_types = inside(
        [i for i in ast.walk(tree) if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)]
    )
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        targets: list[list[str]] = []
        if isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "adaptlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, up level - 1
                mod = package[: len(package) - (node.level - 1)] + (
                    node.module.split(".") if node.module else []
                )
                targets = [mod] if mod else [[a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "adaptlab":
                mod = node.module.split(".")[1:]
                targets = [mod] if mod else [[a.name] for a in node.names]
        kind = "types" if id(node) in for_types else "function" if id(node) in in_function else "module"
        for t in targets:
            if t and t[0] != "__init__":
                dst = node_of(t)
                found[dst] = min(found.get(dst, "types"), kind, key=KINDS.index)
    return found


KIND: dict[tuple[str, str], str] = {}  # (importer, imported) -> the strongest kind of import between them


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(ROOT.rglob("*.py")):
        src = node_of(list(path.relative_to(ROOT).with_suffix("").parts))
        if src == "__init__":
            continue
        for dst, kind in imports_of(path).items():
            if dst != src:
                edges[src].add(dst)
                KIND[(src, dst)] = min(KIND.get((src, dst), "types"), kind, key=KINDS.index)
    return edges


def show(src: str, dst: str) -> str:
    kind = KIND[(src, dst)]
    return dst if kind == "module" else f"{dst} (in a function)" if kind == "function" else f"{dst} (types)"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    edges = graph()
    unplaced = sorted((set(edges) | {w for ws in edges.values() for w in ws}) - set(RANK))
    if unplaced:
        print("not in LAYERS:", ", ".join(unplaced))
    print("## edges (importer -> imported)")
    for src in sorted(edges, key=lambda n: (RANK.get(n, 99), n)):
        if edges[src]:
            dsts = sorted(edges[src], key=lambda n: (RANK.get(n, 99), n))
            print(f"{src} -> {', '.join(show(src, d) for d in dsts)}")
    print("\n## cycles (groups of nodes that reach each other)")
    for comp in cycles(edges):
        print(", ".join(comp))
    module_level = {s: {d for d in ds if KIND[(s, d)] == "module"} for s, ds in edges.items()}
    print("\n## cycles counting module-level imports only")
    for comp in cycles(module_level):
        print(", ".join(comp))
    print("\n## upward edges (a lower layer importing a higher one)")
    for src in sorted(edges, key=lambda n: (RANK.get(n, 99), n)):
        for dst in sorted(edges[src]):
            if RANK.get(dst, 99) > RANK.get(src, 99) and LAYER_OF.get(dst) != LAYER_OF.get(src):
                print(f"{src} ({LAYER_OF.get(src)}) -> {show(src, dst)} ({LAYER_OF.get(dst)})")


if __name__ == "__main__":
    main()
