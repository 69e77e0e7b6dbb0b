"""The package's import rules, read from the source with `ast` (nothing is imported).

(a) the module-level imports between memopt's modules form no cycle (imports inside
    functions, made when called, and imports under ``if TYPE_CHECKING:`` may close one);
(b) memopt.solvers is plain optimisation: it imports neither torch nor memopt outside memopt.solvers;
(c) the layers below the entry points (report, measure, lower, passes, capture, solvers)
    never import the entry points (memopt.api, memopt.backend, memopt.cli) or the package's
    face (memopt itself, which imports them);
(d) measurement does not depend on planning: memopt.measure imports nothing from memopt.passes or memopt.solvers.

(b) to (d) count every import, at module level or inside a function.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memopt"

ENTRY_POINTS = ("memopt.api", "memopt.backend", "memopt.cli")
BELOW_ENTRY_POINTS = ("memopt.report", "memopt.measure", "memopt.lower", "memopt.passes", "memopt.capture",
                      "memopt.solvers")

# (c) imports that break the rule today and that moving files cannot fix, each with its reason
KNOWN_ENTRY_POINT_IMPORTS = {
    # known: the Pareto sweep plans the step at each budget with memopt.api.plan (and reads its _device_of);
    # it drives the user's entry point rather than serving it
    ("memopt.report.pareto", "memopt.api"),
}


@dataclass(frozen=True)
class Import:
    importer: str  # the module that imports
    target: str  # the memopt module it imports (or the top-level name of an outside package)
    line: int
    lazy: bool  # inside a function: runs when called, not when the module is imported
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs


def module_names() -> dict[str, Path]:
    """Every module under memopt/, by dotted name (a package by its own name, for its __init__.py)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def _resolve(name: str) -> str:
    """The module that importing ``name`` names: itself, or its longest prefix that is a module."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) if parts else name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(importer: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """What the import statement imports: memopt modules, or the top-level name of an outside package."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package, one level up per dot after the first
            package = importer.split(".")
            if MODULES[importer].name != "__init__.py":
                package = package[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            names.append(submodule if submodule in MODULES else base)  # `from memopt.x import y`: y a module or a name
    targets = []
    for name in names:
        target = _resolve(name) if name.split(".")[0] == "memopt" else name.split(".")[0]
        if target not in targets:
            targets.append(target)
    return targets


def imports_of(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []

    def visit(node: ast.AST, lazy: bool, type_checking: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(module, node):
                found.append(Import(module, target, node.lineno, lazy, type_checking))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, type_checking)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, type_checking)

    visit(tree, False, False)
    return found


IMPORTS = [found for module in MODULES for found in imports_of(module)]


def _within(module: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == package or module.startswith(package + ".") for package in packages)


def _where(found: Import) -> str:
    kind = "lazy" if found.lazy else "type-checking" if found.type_checking else "module-level"
    return f"{found.importer} imports {found.target} ({MODULES[found.importer].relative_to(ROOT)}:{found.line}, {kind})"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_modules_are_found():
    assert {"memopt", "memopt.api", "memopt.capture.trace", "memopt.lower.runner", "memopt.report.plan",
            "memopt.measure.profiler", "memopt.solvers.remat_fast"} <= set(MODULES)
    assert any(found.importer == "memopt.report.plan" and found.target == "memopt.capture" for found in IMPORTS)
    assert any(found.importer == "memopt.report.plan" and found.target == "memopt.report.plot" and found.lazy
               for found in IMPORTS)
    assert any(found.importer == "memopt.report.plot" and found.target == "memopt.report.plan"
               and found.type_checking for found in IMPORTS)


def test_module_level_imports_have_no_cycle():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for found in IMPORTS:
        if not found.lazy and not found.type_checking and found.target in MODULES and found.target != found.importer:
            graph[found.importer].add(found.target)
    cycle = _cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_solvers_import_neither_torch_nor_memopt_outside_solvers():
    bad = [_where(found) for found in IMPORTS if _within(found.importer, "memopt.solvers")
           and (found.target == "torch" or (_within(found.target, "memopt") and not _within(found.target, "memopt.solvers")))]
    assert not bad, "memopt.solvers must stay plain optimisation:\n" + "\n".join(bad)


def test_layers_below_the_entry_points_do_not_import_them():
    found_pairs = set()
    bad = []
    for found in IMPORTS:
        if _within(found.importer, BELOW_ENTRY_POINTS) and (_within(found.target, ENTRY_POINTS) or found.target == "memopt"):
            found_pairs.add((found.importer, found.target))
            if (found.importer, found.target) not in KNOWN_ENTRY_POINT_IMPORTS:
                bad.append(_where(found))
    assert not bad, "imports of the entry points (or the package's face) from below them:\n" + "\n".join(bad)
    stale = KNOWN_ENTRY_POINT_IMPORTS - found_pairs
    assert not stale, f"known violations that are gone (remove them from KNOWN_ENTRY_POINT_IMPORTS): {sorted(stale)}"


def test_measurement_does_not_depend_on_planning():
    bad = [_where(found) for found in IMPORTS
           if _within(found.importer, "memopt.measure") and _within(found.target, ("memopt.passes", "memopt.solvers"))]
    assert not bad, "memopt.measure must not import planning:\n" + "\n".join(bad)
