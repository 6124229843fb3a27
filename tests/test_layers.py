"""The layers of docs/layout.md, checked on the import graph (grimp, the library under import-linter).

`lint-imports` (run by .ci/run) holds the layer contracts of pyproject.toml; these tests add what a contract does
not state: no import cycle between any two modules, and util/ importing nothing of the project.
"""

from __future__ import annotations

import grimp

PACKAGES = ("util", "dataloaders", "models", "data_preprocessing", "evaluation", "engine", "prediction", "launch",
            "bench")


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a set of modules importing in a ring."""
    adjacency = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(root: str) -> None:  # iterative, so deep chains do not hit the recursion limit
        work = [(root, 0)]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, i = work[-1]
            if i < len(adjacency[node]):
                work[-1] = (node, i + 1)
                nxt = adjacency[node][i]
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                ring = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    ring.append(member)
                    if member == node:
                        break
                if len(ring) > 1:
                    found.append(sorted(ring))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_cycle_finder_on_a_hand_made_graph() -> None:
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycle_between_modules() -> None:
    assert _cycles(_graph()) == []


def test_util_imports_nothing_of_the_project() -> None:
    graph = _graph()
    upward = sorted((m, imp) for m in graph.modules if m.split(".")[0] == "util"
                    for imp in graph.find_modules_directly_imported_by(m) if imp.split(".")[0] in PACKAGES[1:])
    assert upward == []
