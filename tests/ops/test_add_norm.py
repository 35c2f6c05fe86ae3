"""add_norm (residual add + norm) of every compiled backend against the reference (see op_cases)."""
import pytest
import torch

from anee_fast.ops import reference as ref
from op_cases import target  # noqa: F401  (fixture)


@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 83), (83, 576)])
@pytest.mark.parametrize("rms,with_bias", [(True, False), (False, True)])
def test_add_norm(target, rows, hidden, rms, with_bias):
    g = torch.Generator().manual_seed(rows * hidden + 1)
    x, residual = torch.randn(2, rows, hidden, generator=g) * 3
    w = 1 + 0.3 * torch.randn(hidden, generator=g)
    b = 0.3 * torch.randn(hidden, generator=g) if with_bias else None
    total, normed = target.ops.add_norm(target.to(x), target.to(residual), target.to(w), target.to(b),
                                        1e-5, rms)
    # The sum is the dtype's own add (exact in float32, one rounding in bf16); the norm reads
    # that rounded sum.
    expect_total = target.to(x) + target.to(residual)
    assert total.dtype == normed.dtype == target.dtype
    assert torch.equal(total, expect_total)
    expect = ref.norm(expect_total.float(), target.exact(w), target.exact(b), 1e-5, rms)
    torch.testing.assert_close(normed.float(), expect, **target.tol)
