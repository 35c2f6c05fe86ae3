"""norm (RMSNorm / LayerNorm) of every compiled backend against the reference (see op_cases)."""
import pytest
import torch

from anee_fast.ops import reference as ref
from op_cases import target  # noqa: F401  (fixture)


@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 83), (83, 576)])
@pytest.mark.parametrize("rms,with_bias", [(True, False), (False, True)])
def test_norm(target, rows, hidden, rms, with_bias):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g) * 3
    w = 1 + 0.3 * torch.randn(hidden, generator=g)
    b = 0.3 * torch.randn(hidden, generator=g) if with_bias else None
    got = target.ops.norm(target.to(x), target.to(w), target.to(b), 1e-5, rms)
    expect = ref.norm(target.exact(x), target.exact(w), target.exact(b), 1e-5, rms)
    assert got.dtype == target.dtype
    torch.testing.assert_close(got.float(), expect, **target.tol)
