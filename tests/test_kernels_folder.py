"""The top-level kernels/ folder (installed as anee_fast.kernels) never shadows the PyPI package
`kernels` for code run from the repository root: imported under that name it hands the import
over to that package, or stays an empty module where none is installed."""
import os
import subprocess
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_from_root(code, extra_path=None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, env=env,
                          capture_output=True, text=True)


def test_the_pypi_package_wins_from_the_repository_root(tmp_path):
    package = tmp_path / "kernels"
    (package / "_internals").mkdir(parents=True)
    (package / "__init__.py").write_text("MARK = 'pypi'\n")
    (package / "_internals" / "__init__.py").write_text("")
    out = _run_from_root("import kernels, kernels._internals; print(kernels.MARK, kernels.__file__)",
                         tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pypi", str(package / "__init__.py")]


def test_without_the_pypi_package_kernels_is_an_empty_module():
    out = _run_from_root("import sys, kernels; print(hasattr(kernels, 'linear'), "
                         "'triton' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_anee_fast_kernels_is_still_the_triton_op_set():
    out = _run_from_root("import anee_fast.kernels as k; print(sorted(k.__all__))")
    assert out.returncode == 0, out.stderr
    ops = ["add_norm", "budget_controller", "linear", "norm", "paged_attention", "policy_step",
           "saturation_codes", "skip_adapter", "skip_kv"]
    assert out.stdout.strip() == str(ops)
