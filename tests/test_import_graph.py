"""No import circles in the package: the runtime import graph is acyclic.

Edges are the ``import``/``from … import`` statements between our own modules, at module level
and inside functions (a lazy import only hides a circle), not those under ``if TYPE_CHECKING:``
(annotations only; they never run). ``from pkg import submodule`` is an edge to the submodule only; ``from pkg import name`` is an
edge to ``pkg``'s ``__init__``, also from inside ``pkg``, where it is the classic
partially-initialised-module trap.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1] / "lightning_landscape"


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 60 and graph["lightning_landscape.callbacks.base"]
    assert cycles(graph) == []


def test_a_planted_circle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "lightning_landscape"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "sub/__init__.py": "from .a import x\n",
        "sub/a.py": "from lightning_landscape.other import y\nx = 1\n",
        # the circle closes behind a lazy import; the TYPE_CHECKING one is no edge
        "other.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from lightning_landscape import c\n"
            "def f():\n    from lightning_landscape.sub import x\n"
            "y = 2\n"
        ),
        "sub/b.py": "from lightning_landscape.sub import a\n",  # a submodule: no circle
        "c.py": "from lightning_landscape import other\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    found = cycles(import_graph(pkg))
    assert found == [
        ["lightning_landscape.other", "lightning_landscape.sub", "lightning_landscape.sub.a"]
    ]
