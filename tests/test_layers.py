"""The package's layers: every import of lightning_bif points down or stays in its layer, and none closes a circle.

The imports are read from the source (``ast``), type-only and function-level imports included, so the
check needs nothing imported and catches an import that only a rarely run path would execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_bif"

#: Bottom to top. A module may import from its own layer and from the layers below it, never from above.
LAYERS = (
    ("contract", {"lightning_bif.version", "lightning_bif.config", "lightning_bif.example_sets",
                  "lightning_bif.functional", "lightning_bif.schedule"}),
    ("curvature", {"lightning_bif.curvature"}),
    ("tuning", {"lightning_bif.tuning"}),
    ("estimation", {"lightning_bif.estimation"}),
    ("snapshot", {"lightning_bif.snapshot"}),
    ("log", {"lightning_bif.log"}),
    ("viewers", {"lightning_bif.viewers"}),
    ("lightning", {"lightning_bif.lightning"}),
    ("public API", {"lightning_bif"}),
)
#: The only layer that may import Lightning.
LIGHTNING_LAYER = "lightning"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if module in prefixes or any(module.startswith(f"{prefix}.") for prefix in prefixes - {"lightning_bif"}):
            return name
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")


RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


def imports_of(module: str) -> set[str]:
    """The lightning_bif modules that ``module`` imports (a package's ``__init__`` counts as the package)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from package import module`` imports the module
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {name for name in found if name.split(".")[0] == "lightning_bif"}


def external_imports_of(module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_import_of_the_package_names_a_module_that_exists() -> None:
    missing = {(module, target) for module, targets in GRAPH.items() for target in targets if target not in MODULES}
    assert not missing


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_or_stay_in_their_layer(module: str) -> None:
    upward = sorted(target for target in GRAPH[module] if RANK[layer_of(target)] > RANK[layer_of(module)])
    assert not upward, f"{module} ({layer_of(module)}) imports from a higher layer: {upward}"


def test_no_import_circle() -> None:
    """Tarjan's strongly connected components of the import graph: every component is one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_only_the_lightning_layer_imports_lightning() -> None:
    importing = sorted(module for module in MODULES
                       if "lightning" in external_imports_of(module) and layer_of(module) != LIGHTNING_LAYER)
    assert not importing, f"Lightning imported outside lightning_bif.lightning: {importing}"


def test_no_private_name_is_imported_from_another_module() -> None:
    private = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                private += [f"{module}: {alias.name}" for alias in node.names
                            if alias.name.startswith("_") and alias.name != "__version__"]
    assert not private


def test_the_guard_sees_an_upward_import_and_a_circle() -> None:
    """The checks above would fail on a layout that breaks the rules (a self-test of the parser and ranks)."""
    assert "lightning_bif.snapshot.snapshotter" in GRAPH["lightning_bif.snapshot.estimate"]
    assert RANK[layer_of("lightning_bif.lightning.callback")] > RANK[layer_of("lightning_bif.estimation.estimator")]
    assert layer_of("lightning_bif.config") == "contract" and layer_of("lightning_bif") == "public API"
    assert "lightning_bif.log.tables" in GRAPH["lightning_bif.log.reader"]  # ``from . import tables``
