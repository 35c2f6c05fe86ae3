"""saturation_codes of every compiled backend against the reference (see op_cases)."""
import pytest
import torch

from anee_fast.ops import reference as ref
from op_cases import target  # noqa: F401  (fixture)


def at_cosine(h, cos, gen):
    """Rows at the given cosines to h's rows, of the same norms."""
    other = torch.randn(h.shape, generator=gen)
    other -= (other * h).sum(-1, keepdim=True) / (h * h).sum(-1, keepdim=True) * h
    other = other / other.norm(dim=-1, keepdim=True) * h.norm(dim=-1, keepdim=True)
    return cos[:, None] * h + (1 - cos[:, None] ** 2).sqrt() * other


@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 83), (83, 768)])
def test_saturation_codes(target, rows, hidden):
    """Every row's code equals the reference's: rows whose residual did not move PROCESS, the
    others SKIP or EXIT by their cosine; budget_left under the threshold EXITs. Cosines are
    drawn away from the thresholds (the sums' order differs between backends)."""
    g = torch.Generator().manual_seed(rows * hidden)
    h = torch.randn(rows, hidden, generator=g) * 2
    n = torch.arange(rows)
    cos = torch.tensor([0.5, 0.985, 0.999, -0.3, 0.9, 0.9995])[n % 6]
    h_prev = at_cosine(h, cos, g)
    h_prev[n % 5 == 4] = h[n % 5 == 4]                        # the previous layer skipped
    budget_left = torch.where(n % 7 == 6, -0.05, 0.3)          # under the threshold: EXIT
    h_t, prev_t = target.to(h), target.to(h_prev)
    args = (0.98, 0.995, 0.05)
    got = target.ops.saturation_codes(h_t, prev_t, budget_left.to(target.device), *args)
    expect = ref.saturation_codes(h_t, prev_t, budget_left.to(target.device), *args)
    assert got.dtype == torch.int8 and got.shape == (rows,)
    assert torch.equal(got.cpu(), expect.cpu())
    if rows >= 7:
        assert {0, 1, 2} <= set(expect.tolist())


def test_saturation_codes_is_the_heuristic_controller(target):
    """HeuristicController proposes through the backend's op: the same codes as its rule written
    as tensor ops (the reference) on a layer context."""
    from anee_fast.control.base import LayerContext
    from anee_fast.control.controllers import HeuristicController

    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 32, generator=g)
    h_prev = at_cosine(h, torch.tensor([0.2, 0.99, 0.9999] * 3), g)
    h_prev[0] = h[0]
    ctx = LayerContext(layer=2, num_layers=8, h=target.to(h), h_prev=target.to(h_prev),
                       budget_left=torch.full((9,), 0.5, device=target.device), ops=target.ops)
    got = HeuristicController().propose(ctx)
    expect = ref.saturation_codes(target.to(h), target.to(h_prev), ctx.budget_left, 0.98, 0.995, 0.0)
    assert torch.equal(got.cpu(), expect.cpu()) and got.tolist()[:3] == [0, 1, 2]
