"""What the per-op test files share: the backends under test and how their results are checked.

Every op of every compiled backend is tested against the pure-PyTorch reference (reference_ops),
one test file per op (tests/ops/test_<op>.py). Fresh random inputs, odd sizes, GQA, block sizes
8/16/32, head dims 64 and 80, caches poisoned with a sentinel: every slot meant to be written is
written, every other slot stays bit-equal. On the CPU the Triton kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest), so shapes stay small.

A plain module, not tests/ops/conftest.py: the test files import `from conftest import ...`
(tests/conftest.py) by name, which a second module named conftest would shadow. A test file
imports the `target` fixture from here.
"""
import pytest
import torch

from anee_fast import backends
from anee_fast.ops.backends import ops_for

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=3e-3)}
SENTINEL = 7.25
# (backend, device, dtype): the CPU cases run in CI; the `cuda` ones on a GPU (make test-gpu), where
# native runs the csrc/cuda kernels (Target fails when the build has none: no silent CPU fallback).
TARGETS = [("triton", "cpu", torch.float32), ("native", "cpu", torch.float32)] + [
    pytest.param((backend, "cuda", dtype), marks=pytest.mark.cuda, id=f"{backend}-cuda-{str(dtype)[6:]}")
    for backend in ("triton", "native") for dtype in (torch.float32, torch.bfloat16)]


def target_id(t):
    return "-".join([t[0], t[1], str(t[2])[6:]])


class Target:
    """A backend's ops on a device and dtype; `to` moves test inputs there. The reference runs
    in float32 on the same (rounded) inputs."""

    def __init__(self, backend, device, dtype):
        status = backends(device)[backend]
        assert status is True, f"backend {backend} is not available on {device}: {status}"
        self.ops, self.device, self.dtype = ops_for(backend), torch.device(device), dtype
        self.tol = TOL[dtype]

    def to(self, t):
        if t is None:
            return None
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def exact(self, t):
        """The float32 reference input equal to what the kernel reads."""
        return None if t is None else self.to(t).float() if t.is_floating_point() else self.to(t)


@pytest.fixture(params=TARGETS, ids=target_id)
def target(request):
    return Target(*request.param)


def poisoned_caches(shape, target):
    """A K and a V cache filled with the sentinel."""
    return (torch.full(shape, SENTINEL, device=target.device, dtype=target.dtype),
            torch.full(shape, SENTINEL, device=target.device, dtype=target.dtype))


def slot_mapping(rows, slots, gen, padding=True):
    """Distinct slots for the rows; rows 1, 4, 7, ... are padding (-1) when asked."""
    mapping = torch.randperm(slots, generator=gen)[:rows]
    if padding:
        mapping[1::3] = -1
    return mapping
