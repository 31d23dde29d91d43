"""slimtrain's modules import each other without a loop.

Read from the source (no import runs): an edge ``a -> b`` for every ``import``/``from ... import`` of a slimtrain
module ``b`` in ``a``, module-level or inside a function, where importing ``b`` from outside its package also
imports the packages above it (their ``__init__``). A function-level import counts because moving an import into
a function to dodge a loop leaves the loop; an import under ``if TYPE_CHECKING:`` does not, since it never runs.
``from pkg import name`` depends on ``pkg`` itself unless every name is a submodule of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "slimtrain").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module if is_package else module.rpartition(".")[0]
    if node.level:
        parts = base.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module
    submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return submodules if len(submodules) == len(node.names) else [target, *submodules]


def _imports(module: str, path: Path, known: dict) -> set[str]:
    """The slimtrain modules ``module`` imports, at any depth but ``if TYPE_CHECKING:``."""
    deps: set[str] = set()

    def walk(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, path.name == "__init__.py", node, known):
                    while target not in known and "." in target:  # an imported name, not a module
                        target = target.rpartition(".")[0]
                    if target in known:
                        deps.add(target)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                walk(node.orelse)
            else:
                walk(ast.iter_child_nodes(node))

    walk(ast.parse(path.read_text()).body)
    # Importing a.b.c runs a and a.b first, unless they are packages above this module (already importing).
    for target in list(deps):
        parts = target.split(".")
        for i in range(1, len(parts)):
            package = ".".join(parts[:i])
            if package in known and not module.startswith(package + "."):
                deps.add(package)
    deps.discard(module)
    return deps


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_loop():
    known = modules()
    graph = {m: _imports(m, p, known) for m, p in known.items()}
    assert "slimtrain.optimizers.registry" in graph["slimtrain.optimizers.base"]  # the reading sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_a_loop_is_found_even_through_a_function_level_import(tmp_path):
    """The reader itself: a loop closed by an import inside a function, or through a package's __init__, is a
    loop; one under TYPE_CHECKING is not."""
    pkg = tmp_path / "slimtrain"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import g\n"
                                      "def f():\n    return 1\n")
    (pkg / "b.py").write_text("def g():\n    from .sub.a import f\n    return f()\n")
    known = {f"slimtrain{n}": p for n, p in [("", pkg / "__init__.py"), (".sub", pkg / "sub" / "__init__.py"),
                                              (".sub.a", pkg / "sub" / "a.py"), (".b", pkg / "b.py")]}
    graph = {m: _imports(m, p, known) for m, p in known.items()}
    assert find_cycle(graph) is None and graph["slimtrain.b"] == {"slimtrain.sub", "slimtrain.sub.a"}
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..b import g\n    return g\n")
    graph = {m: _imports(m, p, known) for m, p in known.items()}
    assert find_cycle(graph) == ["slimtrain.b", "slimtrain.sub", "slimtrain.sub.a", "slimtrain.b"]
