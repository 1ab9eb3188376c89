"""The package has layers with no back-edges and no import cycles (read from the source).

    0  clax.typing, clax._validation, clax._host          foundation
    1  clax.data, clax.models, clax.metrics               leaf libraries
    2  clax.core                                          the contract
    3  subspace, fisher, replay, analytic, transforms,    building blocks
       edits, params, unlearning
    4  clax.methods                                       registered methods
    5  clax.training                                      the driver

A module may import its own layer's packages (building blocks use each other, without
cycles) and lower layers only. Imports inside functions are counted too, so a back-edge
cannot hide in one; the only exception is the lazy loader of ``clax/__init__.py``.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "clax"
LAYERS = {
    "typing": 0, "_validation": 0, "_host": 0,
    "data": 1, "models": 1, "metrics": 1,
    "core": 2,
    "subspace": 3, "fisher": 3, "replay": 3, "analytic": 3, "transforms": 3, "edits": 3,
    "params": 3, "unlearning": 3,
    "methods": 4,
    "training": 5,
}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "clax" and len(parts) > 1 else None


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(imported clax module, line, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "clax":
                    found.extend((f"clax.{a.name}", child.lineno, in_function)
                                 for a in child.names)
                else:
                    found.append((child.module, child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return [(m, line, f) for m, line, f in found if m.split(".")[0] == "clax"]


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        yield module, path


def test_every_package_has_a_layer():
    packages = {_package(m) for m, _ in _modules()} - {None}
    assert packages <= set(LAYERS), f"give these packages a layer: {packages - set(LAYERS)}"


def test_no_back_edges_and_no_function_level_imports():
    problems = []
    for module, path in _modules():
        own = _package(module)
        for target, line, in_function in _imports(path):
            other = _package(target)
            if own is None:  # clax/__init__.py: the lazy loader imports by name at run time
                continue
            if in_function:
                problems.append(f"{path.name}:{line} imports {target} inside a function")
            if other is not None and LAYERS[other] > LAYERS[own]:
                problems.append(f"{module}:{line} (layer {LAYERS[own]}) imports {target} "
                                f"(layer {LAYERS[other]})")
    assert not problems, "\n".join(problems)


def test_packages_form_no_cycle():
    graph: dict[str, set[str]] = {}
    for module, path in _modules():
        own = _package(module)
        if own is None:
            continue
        for target, _, _ in _imports(path):
            other = _package(target)
            if other is not None and other != own:
                graph.setdefault(own, set()).add(other)

    def visit(node, stack):
        if node in stack:
            pytest.fail(f"import cycle between packages: {' -> '.join([*stack, node])}")
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*stack, node])

    for package in sorted(graph):
        visit(package, [])
