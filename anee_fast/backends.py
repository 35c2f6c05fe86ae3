"""Which execution backends this install can use, and the choice behind backend="auto"."""
import importlib.util
import os

BACKENDS = ("reference", "triton", "native")


def backends() -> dict:
    """{name: True if usable here, else a string saying why not}."""
    found = {"reference": True}
    if importlib.util.find_spec("triton") is None:
        found["triton"] = "triton is not installed"
    else:
        found["triton"] = "the Triton kernels are not part of this version yet"
    found["native"] = "the C++/CUDA extension anee_fast._C is not part of this version yet"
    return found


def select_backend(requested=None) -> str:
    requested = requested or os.environ.get("ANEE_FAST_BACKEND") or "auto"
    if requested == "auto":
        available = backends()
        return next(name for name in ("native", "triton", "reference") if available[name] is True)
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)} or 'auto'")
    status = backends()[requested]
    if status is not True:
        raise RuntimeError(f"backend {requested!r} is not available: {status}")
    return requested
