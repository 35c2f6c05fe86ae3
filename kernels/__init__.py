"""Triton kernels of anee_fast (installed as `anee_fast.kernels`): the op set of the "triton"
backend, one file per op, each with the signature of anee_fast/ops/reference.py.

Set TRITON_INTERPRET=1 before importing to run them on the CPU (tests do, when there is no GPU).

Run from the repository root, `import kernels` would find this folder before the PyPI package
`kernels` (which transformers uses, and whose setuptools hook pip loads while installing us).
Imported under that top-level name, this module therefore hands the import over to that package;
where none is installed it stays an empty module (transformers, which imports `kernels` to read its
version, then finds none and does without).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _repository]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module     # what the running import statement returns
        _spec.loader.exec_module(_module)
else:
    from .add_norm import add_norm
    from .budget_controller import budget_controller
    from .linear import linear
    from .norm import norm
    from .paged_attention import paged_attention
    from .policy_step import policy_step
    from .saturation_codes import saturation_codes
    from .skip_adapter import skip_adapter
    from .skip_kv import skip_kv

    __all__ = ["norm", "add_norm", "linear", "skip_kv", "skip_adapter", "paged_attention",
               "policy_step", "saturation_codes", "budget_controller"]
