"""The import rules of the package, read from the source (ast; nothing is imported):

- no cycles: no module of k5 imports, directly or through others, a module that imports it back;
- engine/ (the model, its checkpoints, encoders, VAEs, sampling and pipelines) imports neither launch/ (the
  front-ends' machinery) nor parallel/ (the layouts): parallelism is applied to the engine from outside;
- kernels/ imports neither engine/ nor launch/.

Every import counts, also one inside a function (a deferred import is still a dependency: it only hides the cycle
until the function runs). Names are resolved to the longest module of the package they start with, so ``from
k5.engine.checkpoints import dit`` is an edge to k5.engine.checkpoints.dit.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"k5": "k5", "engine": "k5.engine", "parallel": "k5.parallel", "kernels": "k5.kernels",
           "launch": "k5.launch", "serve": "k5.serve", "bench": "k5.bench"}
FORBIDDEN = {"k5.engine": ("k5.launch", "k5.parallel"), "k5.kernels": ("k5.engine", "k5.launch")}


def module_name(path: Path) -> str:
    top, *rest = path.relative_to(ROOT).with_suffix("").parts
    if rest and rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([FOLDERS[top], *rest])


def modules() -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts}


def imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for imported in imported_names(ast.parse(path.read_text(), str(path))):
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def connect(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
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

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_checker_finds_a_cycle_and_a_forbidden_edge():
    # The checks themselves, on a made-up graph: a three-module circle and a clean chain.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import k5.launch.job\ndef f():\n    from k5.parallel.plan import build_parallel\n")
    assert {"k5.launch.job", "k5.parallel.plan", "k5.parallel.plan.build_parallel"} <= imported_names(tree)


def test_the_graph_covers_the_package():
    graph = import_graph()
    for name in ("k5.engine.model.dit", "k5.engine.checkpoints.dit", "k5.launch.engine", "k5.parallel.plan",
                 "k5.kernels.attention", "k5.serve.engine"):
        assert name in graph, name
    # An edge the code really has (a deferred import inside Engine.load), so an empty graph cannot pass.
    assert "k5.parallel.plan" in graph["k5.launch.engine"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_engine_and_kernels_import_only_downwards():
    bad = [f"{name} imports {dep}" for name, deps in sorted(import_graph().items())
           for room, forbidden in FORBIDDEN.items() if name.startswith(room + ".")
           for dep in sorted(deps) if dep.startswith(forbidden)]
    assert bad == []
