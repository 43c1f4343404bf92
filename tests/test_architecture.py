"""The import graph of scqbm: no cycle, and no arrow from a lower layer to a higher one.

Layers, lowest first: prior <- samplers <- module <- train <- model <- tl / cli / benchmark.
Edges are the import statements themselves (module level and inside functions alike, since
a deferred import is still a dependency), read with ``ast`` from the source tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "scqbm"

#: Rank of each top-level part of the package; an import may only point to an equal or lower
#: rank. ``scqbm`` itself (the lazy facade) sits on top.
LAYERS = {
    "_validation": 0,
    # The private scvi-tools names (scvi-tools only, no scqbm import).
    "_compat": 0,
    "nn": 0,
    "prior": 1,
    "samplers": 2,
    "module": 3,
    "train": 4,
    "model": 5,
    "datasets": 5,
    "tl": 6,
    "cli": 6,
    "benchmark": 6,
    # The facade (`scqbm.__version__`, lazy `scqbm.QBMVAE`): for applications only.
    "": 6,
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of scqbm it imports``."""
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import sub` imports the submodule when there is one.
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]  # `import a.b.c` -> the module a.b.c
                if target.startswith(PACKAGE) and target != name:
                    graph[name].add(target)
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_part_of_the_package_has_a_layer():
    assert {layer(m) for m in import_graph()} <= set(LAYERS)


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_never_point_upwards():
    upward = sorted(
        f"{src} -> {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if LAYERS[layer(dst)] > LAYERS[layer(src)]
    )
    # No exceptions: the sampling service takes its version from the package metadata.
    assert upward == []


def test_the_graph_sees_real_edges():
    # Guards the checks above against an empty or broken graph.
    graph = import_graph()
    assert "scqbm.prior._boltzmann" in graph["scqbm.module._qbmvae"] or any(
        t.startswith("scqbm.prior") for t in graph["scqbm.module._qbmvae"]
    )
    assert "scqbm.samplers._calibration" in graph["scqbm.samplers._registry"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
