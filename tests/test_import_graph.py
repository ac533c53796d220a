"""The package's imports run one way: no cycle between wsi_mil modules, lazy imports included."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "wsi_mil"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(tree: ast.Module, modules: set[str]) -> set[str]:
    """Every wsi_mil module the tree imports, at any depth, except under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """module -> the wsi_mil modules it imports; a package and its own submodules are not edges."""
    paths = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        imported = _imported_modules(ast.parse(path.read_text(encoding="utf-8")), modules)
        graph[name] = {
            target
            for target in imported
            if target != name
            and not target.startswith(f"{name}.")
            and not name.startswith(f"{target}.")
        }
    return graph


def test_the_import_graph_sees_lazy_imports():
    graph = import_graph()
    assert "wsi_mil.service.ray_jobs" in graph["wsi_mil.service.workers"]  # imported inside a function
    assert "wsi_mil.service.slide_jobs" in graph["wsi_mil.service.ray_jobs"]


def test_no_import_cycles_between_modules():
    try:
        tuple(TopologicalSorter(import_graph()).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")

