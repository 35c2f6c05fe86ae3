"""The package's imports point one way: every module imports only from its own subpackage or
from layers below it (the table in docs/architecture.md), never up and never across."""
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "anee_fast"
KERNELS = PACKAGE.parent / "kernels"          # installed as anee_fast.kernels

# Lower number = lower layer. Units of the same number may not import each other.
LAYERS = {
    "actions": 0, "trace": 1, "_C": 1,
    "ops": 2, "kernels": 3,                  # Triton kernels reuse the reference's checks
    "model": 4,
    "control": 5,
    "engine": 6,
    "llm": 7,
    "serving": 8, "compat": 8, "eval": 8,
    "training": 9,
    "cli": 10,
    "__init__": 11,
}
OFFLINE = ("anee_fast.serving", "anee_fast.eval", "anee_fast.training", "anee_fast.compat",
           "anee_fast.cli")


def _modules():
    """(dotted module name, path) of every module of the package and of kernels/."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield ".".join(parts), path
    for path in sorted(KERNELS.glob("*.py")):
        yield "anee_fast.kernels." + path.stem, path


def _unit(module: str) -> str:
    """The layer unit of a dotted name under anee_fast: its subpackage or root module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: pathlib.Path):
    """Every anee_fast module that `module` imports, at top level or inside a function."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import name`: name may be a module of pkg or an attribute; both lie in pkg's unit
            # unless pkg is the package root, where the name is the unit.
            names = [f"{prefix}.{a.name}" if prefix == "anee_fast" else prefix for a in node.names]
        else:
            continue
        for name in names:
            if name == "anee_fast" or name.startswith("anee_fast."):
                yield node.lineno, name


def test_every_import_points_down_or_stays_in_its_subpackage():
    bad = []
    for module, path in _modules():
        unit = _unit(module)
        assert unit in LAYERS, f"{module}: {unit} has no layer in this test's table"
        for line, target in _imports(module, path):
            to = _unit(target)
            assert to in LAYERS, f"{module}:{line} imports {target}, whose unit has no layer"
            if to != unit and LAYERS[to] >= LAYERS[unit] and unit != "__init__":
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} imports {target}")
    assert not bad, "imports pointing up or across:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk above resolves relative imports inside functions (a check that could fail)."""
    path = tmp_path / "model_runner.py"
    path.write_text("def f():\n    from ..training import class_plans\n")
    assert [t for _, t in _imports("anee_fast.engine.model_runner", path)] == ["anee_fast.training"]


@pytest.mark.parametrize("entry", ["anee_fast.engine", "anee_fast.engine.llm_engine", "anee_fast.llm",
                                   "anee_fast.control.registry"])
def test_the_runtime_imports_no_offline_code(entry):
    code = (f"import sys, {entry}\n"
            f"print('\\n'.join(m for m in sys.modules if m.startswith({OFFLINE!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {entry} loaded: {out.stdout.split()}"
