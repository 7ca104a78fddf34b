"""The import graph of the first-party code, read with ast (nothing is imported): no module imports
itself back through others, and the layers point one way (the service -> the Ray adapters -> dg2pf_core;
the light client and the wire contract free of torch and Ray).

Every import statement is an edge, the ones inside functions too: a "lazy" import only moves the
circle to run time. ``import a.b.c`` is an edge to ``a.b.c``; ``from a.b import c`` to ``a.b.c`` when
that is a module, else to ``a.b``; a package is its ``__init__.py``, with no edge to its submodules
but the ones it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Where each first-party package lives: its folder's parent is the folder Python imports it from.
PACKAGES = {
    "dg2pf_core": ROOT,
    "dg2pf_ray": ROOT,
    "dg2pf_cli": ROOT,
    "bench": ROOT,
    "dg2pf_client": ROOT / "clients",
    "dg2pf_contract": ROOT / "clients",
    "dg2pf_service": ROOT / "service",
}


def _module_files() -> dict[str, Path]:
    """Module name -> its file, for every .py file of the first-party packages."""
    files: dict[str, Path] = {}
    for package, parent in PACKAGES.items():
        for path in sorted((parent / package).rglob("*.py")):
            parts = list(path.relative_to(parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _statements(nodes: list[ast.stmt]):
    """Every statement, nested ones too (a function's, a class's, an if's, a try's): where imports are.
    Expressions hold none, and skipping them keeps this several times faster than ast.walk."""
    for node in nodes:
        yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, name, None) or [])


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The modules ``module`` imports (first-party by full name, others by their top-level name), with
    the line of each import statement."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def target(name: str) -> str:
        """``name`` itself if first-party and known, else its longest known prefix, else its top level."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in known:
                return ".".join(parts[:end])
        return parts[0]

    for node in _statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found += [(target(alias.name), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in known else target(source), node.lineno))
    return found


def _graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """The modules' files, and module -> {imported module or top-level name: first line importing it}."""
    files = _module_files()
    known = set(files)
    edges: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        out: dict[str, int] = {}
        for name, line in _imports(module, path, known):
            if name != module:  # `from . import x` inside pkg/__init__ when x is no module: pkg's own names
                out.setdefault(name, line)
        edges[module] = out
    return files, edges


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm): a
    shortest one through the component's first module, the edges to look at first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def first_party(module: str) -> list[str]:
        return sorted(n for n in edges[module] if n in edges)

    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(first_party(start)))]  # iterative: the graph is deep enough for recursion limits
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(first_party(child))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return [_shortest_cycle(component, edges) for component in sorted(components)]


def _shortest_cycle(component: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    inside, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(n for n in edges[node] if n in inside):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a component of more than one module has one


GRAPH = _graph()


def _describe(cycle: list[str], files: dict[str, Path], edges: dict[str, dict[str, int]]) -> str:
    steps = [f"{files[a].relative_to(ROOT)}:{edges[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def test_the_graph_sees_every_package_and_function_level_imports():
    files, edges = GRAPH
    assert {m.split(".")[0] for m in files} == set(PACKAGES)
    # A lazy import inside a function is an edge: dg2pf_client's console script imports its client there.
    assert "dg2pf_client.client" in edges["dg2pf_client.cli"]
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}) == [["a", "b", "c", "a"]]


def test_no_module_imports_itself_back_through_others():
    files, edges = GRAPH
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, files, edges) for c in cycles)


HEAVY_FOR_THE_WIRE = {"torch", "torchvision", "ray", "fastapi", "sqlalchemy", "numpy"}
FIRST_PARTY = set(PACKAGES)


# package -> (the first-party packages it may import, besides itself; None: any) and what it never imports
LAYERS = {
    "dg2pf_contract": (set(), HEAVY_FOR_THE_WIRE),
    "dg2pf_client": ({"dg2pf_contract"}, {"torch", "torchvision", "ray"}),
    "dg2pf_core": (None, {"ray", "fastapi", "sqlalchemy", "dg2pf_ray", "dg2pf_service", "dg2pf_cli"}),
    "dg2pf_ray": (None, {"dg2pf_service", "fastapi"}),
}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_each_layer_imports_only_what_is_below_it(package):
    files, edges = GRAPH
    allowed, never = LAYERS[package]
    wrong = []
    for module, out in sorted(edges.items()):
        if module.split(".")[0] != package:
            continue
        for name, line in sorted(out.items()):
            top = name.split(".")[0]
            first_party_not_allowed = (
                top in FIRST_PARTY and top != package and allowed is not None and top not in allowed
            )
            if top in never or first_party_not_allowed:
                wrong.append(f"{files[module].relative_to(ROOT)}:{line} imports {name}")
    assert wrong == []
