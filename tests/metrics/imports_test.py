"""clax.metrics layering: no import cycle, no function-level imports of metrics modules, and
no heavy dependency (jax, orbax, matplotlib at import time) in any metrics module."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

METRICS = pathlib.Path(__file__).resolve().parents[2] / "clax" / "metrics"
MODULES = sorted(p.stem for p in METRICS.glob("*.py") if p.stem != "__init__")
HEAVY = ("jax", "jaxlib", "orbax", "flax", "optax", "matplotlib", "sklearn", "tensorflow")


def _imports(path):
    """``[(module, at_module_level)]`` for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [(n, id(node) in top) for n in names]
    return found


def _metrics_deps(module):
    deps = set()
    for name, at_top in _imports(METRICS / f"{module}.py"):
        parts = name.split(".")
        if parts[:2] == ["clax", "metrics"] and len(parts) > 2 and parts[2] in MODULES:
            assert at_top, f"clax.metrics.{module} imports {name} inside a function"
            deps.add(parts[2])
    return deps - {module}


def test_no_cycle_and_no_function_level_imports():
    graph = {m: _metrics_deps(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])
    assert graph["curves"] == set() and graph["io"] == set() and graph["continual"] == set()
    assert "report" not in graph["plots"] and "report" not in graph["stability"]


@pytest.mark.parametrize("module", MODULES)
def test_no_heavy_import_at_module_level(module):
    for name, at_top in _imports(METRICS / f"{module}.py"):
        if name.split(".")[0] in HEAVY:
            assert not at_top, f"clax.metrics.{module} imports {name} at module level"


def test_importing_metrics_loads_nothing_heavy():
    # A stub top-level package, so that clax/__init__.py (which imports jax) is not run: each
    # metrics module alone, in a fresh interpreter.
    code = textwrap.dedent(
        f"""
        import sys, types
        pkg = types.ModuleType("clax")
        pkg.__path__ = [{str(METRICS.parent)!r}]
        sys.modules["clax"] = pkg
        import importlib
        importlib.import_module("clax.metrics." + sys.argv[1])
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(",".join(heavy) or "ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for module in MODULES:
        proc = subprocess.run([sys.executable, "-c", code, module], capture_output=True,
                              text=True, timeout=120, env=env, cwd=METRICS.parent.parent)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "ok", (module, proc.stdout)
