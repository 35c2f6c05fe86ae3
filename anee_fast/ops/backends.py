"""Which execution backends this install can use, their op sets, and backend="auto".

Every backend provides the ops of `reference.py` (the contract: norm, add_norm, linear, skip_kv,
skip_adapter, paged_attention, policy_step, saturation_codes, budget_controller) with the same
names and signatures; `ops_for(name)` returns the module that holds them.
"""
import importlib
import importlib.util
import os

BACKENDS = ("reference", "triton", "native")
_OPS_MODULES = {"reference": "anee_fast.ops.reference", "triton": "anee_fast.kernels",
                "native": "anee_fast.ops.native"}


def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import torch
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA GPU (set TRITON_INTERPRET=1 before importing to run the kernels on the CPU)"
    try:
        importlib.import_module(_OPS_MODULES["triton"])
    except Exception as e:       # a broken install must say why, not vanish from the list
        return f"the Triton kernels failed to import: {type(e).__name__}: {e}"
    return True


def _native_status(device_type: str):
    try:
        native = importlib.import_module(_OPS_MODULES["native"])
    except Exception as e:
        return f"the C++ extension anee_fast._C is not available: {type(e).__name__}: {e}"
    if not native.supports(device_type):
        hint = (" (csrc/cuda is compiled only when torch has CUDA and nvcc is found at build time: "
                "reinstall with CUDA_HOME set)" if device_type == "cuda" else "")
        return f"this build of anee_fast._C has no {device_type} kernels{hint}"
    return True


def backends(device=None) -> dict:
    """{name: True if usable here, else a string saying why not}, for `device` (default: the
    GPU when there is one, else the CPU)."""
    import torch
    device_type = torch.device(device).type if device is not None else \
        ("cuda" if torch.cuda.is_available() else "cpu")
    return {"reference": True, "triton": _triton_status(), "native": _native_status(device_type)}


def select_backend(requested=None, device_type: str = "cpu") -> str:
    """The backend to run on a device of `device_type`. "auto" (or None) takes
    ANEE_FAST_BACKEND when set, else the fastest usable one: on a GPU Triton (measured on an
    H100, docs/gpu-results.md: its paged attention and norm beat the CUDA kernels at every
    size), on the CPU native (the Triton kernels only run in Triton's slow interpreter there)."""
    if requested in (None, "auto"):      # the environment refines "auto", never a named choice
        requested = os.environ.get("ANEE_FAST_BACKEND") or "auto"
    if requested == "auto":
        available = backends(device_type)
        order = ("triton", "native", "reference") if device_type == "cuda" else ("native", "reference")
        return next(name for name in order if available[name] is True)
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)} or 'auto'")
    status = backends(device_type)[requested]
    if status is not True:
        raise RuntimeError(f"backend {requested!r} is not available: {status}")
    return requested


def ops_for(name: str):
    return importlib.import_module(_OPS_MODULES[name])
