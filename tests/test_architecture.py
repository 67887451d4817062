"""The package's import graph keeps its layers: no cycles, no upward imports, one user of the facade.

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` and
``from ... import`` statement counts, at module level and inside functions (lazy imports), since a
lazy import hides a dependency without removing it. Relative imports are resolved against the
importing module's package; ``from .pkg import name`` is an edge to ``pkg.name`` when that is a
module and to ``pkg`` (its ``__init__``) otherwise, and an edge to a package's ``__init__`` counts
as an edge to that package.

Layers, bottom to top (a module may import its own layer and the layers below it):

0. ground: ``_version``, ``_signature``, ``errors``, ``budget``, ``selection``, ``context``, ``registry``;
1. ``criteria``: set functions over tokens, and the greedy loop kernels their fast paths share
   with the selectors (``criteria/_loops.py``);
2. ``selectors``: optimisers of a criterion under a budget;
3. ``methods``: stages composed from criteria and selectors, and the method builders
   (``methods/build.py``), which code inside the package uses instead of the facade;
4. ``adapters``: per-model glue;
5. ``runtime``: running methods on models (may import adapters, not the reverse);
6. ``testing``: conformance checks, hypothesis strategies, tiny models (anything below);
7. ``evaluation``: the VQA runner, records and tables; it takes the testbed's question families as
   data instead of importing the testbed;
8. ``testbed``: the synthetic scenes, model and oracle, built on the evaluation package;
9. ``cli``, ``api`` and ``integrations``: the command line, the public functional facade, and the
   integrations with evaluation harnesses (lmms-eval), which nothing below imports;
10. ``tokenprune/__init__.py``, the top.

Besides the layers, only ``tokenprune/__init__.py`` may import ``tokenprune.api``: the facade
re-exports what the lower modules define, and lower modules import those definitions directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "tokenprune"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

#: Layers, bottom to top: first component under the package -> rank ("" is the package root).
LAYERS = [
    ("ground", {"_version", "_signature", "errors", "budget", "selection", "context", "registry"}),
    ("criteria", {"criteria"}),
    ("selectors", {"selectors"}),
    ("methods", {"methods"}),
    ("adapters", {"adapters"}),
    ("runtime", {"runtime"}),
    ("testing", {"testing"}),
    ("evaluation", {"evaluation"}),
    ("testbed", {"testbed"}),
    ("cli, api and integrations", {"cli", "api", "integrations"}),
    ("package root", {""}),
]
RANK = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}
FACADE = f"{PACKAGE}.api"


def module_files(package_dir: Path = PACKAGE_DIR) -> dict:
    """``{module name: (path, is_package)}`` for every ``.py`` file of the package."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _known(name: str, modules) -> str | None:
    """``name`` if it is a module of the package, else its longest prefix that is (``None``: outside)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(source: str, module: str, is_package: bool, modules) -> list:
    """Edges ``(target module, line)`` from one module's source to modules of the package.

    Parameters
    ----------
    source : str
        The module's source.
    module : str
        Its dotted name.
    is_package : bool
        Whether it is a package's ``__init__`` (relative imports resolve against itself).
    modules : collection of str
        Every module name of the package.

    Returns
    -------
    list of (str, int)
    """
    package = module if is_package else module.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, modules)
                if target is not None:
                    edges.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if _known(base, modules) is None:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                edges.append((sub if sub in modules else _known(base, modules), node.lineno))
    return [(t, line) for t, line in edges if t != module]


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict:
    """``{(importer, imported): [(file, line), ...]}`` over the modules of the package."""
    modules = module_files(package_dir)
    lines = {}
    for name, (path, is_package) in modules.items():
        rel = path.relative_to(package_dir.parent).as_posix()
        for target, line in imports_of(path.read_text(encoding="utf-8"), name, is_package, modules):
            lines.setdefault((name, target), set()).add((rel, line))
    return {edge: [f"{rel}:{line}" for rel, line in sorted(at)] for edge, at in lines.items()}


def layer_of(module: str) -> int | None:
    """The rank of ``module``'s layer (``None``: not placed in :data:`LAYERS`)."""
    part = module.split(".")[1] if "." in module else ""
    return RANK.get(part)


def strongly_connected(nodes, edges) -> list:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    succ = {n: [] for n in nodes}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(succ[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _describe(graph, edges) -> str:
    """One line per edge: ``importer -> imported (file:line, ...)``."""
    return "\n".join(f"  {a} -> {b} ({', '.join(graph[(a, b)])})" for a, b in sorted(edges))


@pytest.fixture(scope="module")
def graph():
    """The package's import graph, read once for the module."""
    return import_graph()


# -- the reader itself ----------------------------------------------------------------------------
def test_imports_are_resolved_relative_to_the_importing_module():
    modules = {"pkg", "pkg.a", "pkg.a.x", "pkg.b", "pkg.b.y", "pkg.c"}
    src = ("from ..b.y import Z\nfrom ..b import y, helper\nfrom . import x\nfrom .. import c\n"
           "import pkg.c\nimport numpy\n\ndef f():\n    from ..b import thing\n    import pkg\n")
    edges = sorted(imports_of(src, "pkg.a.m", False, modules))
    assert edges == sorted([("pkg.b.y", 1), ("pkg.b.y", 2), ("pkg.b", 2), ("pkg.a.x", 3), ("pkg.c", 4),
                            ("pkg.c", 5), ("pkg.b", 9), ("pkg", 10)])
    # in a package's __init__, "." is the package itself
    assert imports_of("from .x import f\nfrom . import x\n", "pkg.a", True, modules) == [("pkg.a.x", 1),
                                                                                         ("pkg.a.x", 2)]


def test_cycles_are_found():
    assert strongly_connected({"a", "b", "c", "d"}, [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [
        ["a", "b", "c"]]
    assert strongly_connected({"a", "b"}, [("a", "b")]) == []


# -- the package ----------------------------------------------------------------------------------
def test_every_module_has_a_layer(graph):
    unplaced = sorted(m for m in module_files() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_no_import_cycles(graph):
    comps = strongly_connected(module_files(), graph)
    if comps:
        lines = []
        for comp in comps:
            members = set(comp)
            lines.append("cycle " + " <-> ".join(comp) + ":")
            lines.append(_describe(graph, [e for e in graph if e[0] in members and e[1] in members]))
        pytest.fail("import cycles between modules of the package (lazy imports included):\n" + "\n".join(lines))


def test_layers_import_only_downwards(graph):
    bad = [(a, b) for a, b in graph
           if layer_of(a) is not None and layer_of(b) is not None and layer_of(a) < layer_of(b)]
    if bad:
        names = {rank: name for rank, (name, _) in enumerate(LAYERS)}
        lines = [f"  {a} [{names[layer_of(a)]}] -> {b} [{names[layer_of(b)]}] ({', '.join(graph[(a, b)])})"
                 for a, b in sorted(bad)]
        pytest.fail("imports from a lower layer to a higher one:\n" + "\n".join(lines))


def test_only_the_package_root_imports_the_facade(graph):
    bad = [(a, b) for a, b in graph if b == FACADE and a != PACKAGE]
    assert not bad, (f"only {PACKAGE}/__init__.py may import {FACADE}; import from the defining modules "
                     f"(e.g. tokenprune.methods.build, tokenprune.registry) instead:\n" + _describe(graph, bad))
