"""The package's layout: stage folders in layers, no import circles, no import from a lower layer up.

Every import of a ``dda_ray`` module counts, also one inside a function (a lazy import that dodges a
circle is still a circle); only ``if TYPE_CHECKING:`` blocks (annotations, never executed) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dda_ray"

# Lowest first: a unit (a folder or a module at the package's root) imports only from its own layer or
# those before it. The order is the pipeline's: the config and the run's plumbing, data, models,
# then the stages (synthesis, augment, distill), the MLflow tracking the engines report to, the
# engines, Tune over them, the Python API and the command lines.
LAYERS = ["progress", "config", "runtime", "data", "models", "synthesis", "augment", "distill", "tracking", "engines", "tune", "api", "jobs"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported dda_ray module: line}, every import in the module's body or functions."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and t.startswith("dda_ray"):
                    graph[name].setdefault(t, node.lineno)
    return graph


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(m) for m in _modules()} - {None}
    assert units == set(LAYERS), f"place new units in LAYERS: {sorted(units - set(LAYERS))}; gone: {sorted(set(LAYERS) - units)}"


def test_no_module_imports_from_a_higher_layer():
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = [
        f"{m} (line {line}) imports {t}: {_unit(m)} is below {_unit(t)}"
        for m, deps in import_graph().items()
        for t, line in deps.items()
        if _unit(m) and _unit(t) and rank[_unit(t)] > rank[_unit(m)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_guard_sees_lazy_imports_and_circles(tmp_path, monkeypatch):
    """The checks above fail on what they guard against: an upward import inside a function, a circle."""
    pkg = tmp_path / "dda_ray"
    for unit in ("config", "engines"):
        (pkg / unit).mkdir(parents=True)
        (pkg / unit / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "config" / "tree.py").write_text("def f():\n    from ..engines.local import g\n")
    (pkg / "engines" / "local.py").write_text("from ..config.tree import f\n\ndef g():\n    pass\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", pkg)
    graph = import_graph()
    assert graph["dda_ray.config.tree"] == {"dda_ray.engines.local": 2}
    assert graph["dda_ray.engines.local"] == {"dda_ray.config.tree": 1}
    for check in (test_no_module_imports_from_a_higher_layer, test_no_import_circles):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a package that breaks it")
