"""The training-free adapter fit: exact on data that is linear, reduced rank keeps the directions
of largest fitted variance, and the skip patterns it fits under respect the budget rule."""
import pytest
import torch

from anee_fast.control.depth_policy import DepthAccounting
from anee_fast.training.adapter_ridge import LayerMoments, random_skip_gates, solve_adapter


def test_full_rank_ridge_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    hidden = 12
    a, b = torch.randn(hidden, hidden, generator=g), torch.randn(hidden, generator=g)
    x = torch.randn(4000, hidden, generator=g)
    moments = LayerMoments(hidden)
    for chunk in x.split(1000):                   # sums over chunks = one pass over everything
        moments.add(chunk[None], (chunk @ a.T + b)[None])
    adapter = solve_adapter(moments, rank=hidden, ridge=1e-9)
    fitted = (x @ adapter.down.T) @ adapter.up.T + adapter.bias
    torch.testing.assert_close(fitted, x @ a.T + b, atol=1e-3, rtol=1e-3)


def test_reduced_rank_keeps_the_strongest_directions():
    g = torch.Generator().manual_seed(1)
    hidden = 10
    u, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))
    scales = torch.tensor([5.0, 3.0] + [0.01] * (hidden - 2))
    a = u @ torch.diag(scales) @ u.T                       # two strong directions, the rest tiny
    x = torch.randn(5000, hidden, generator=g)
    moments = LayerMoments(hidden)
    moments.add(x, x @ a.T + 0.5)
    adapter = solve_adapter(moments, rank=2, ridge=1e-9)
    assert adapter.down.shape == (2, hidden) and adapter.up.shape == (hidden, 2)
    fitted = (x @ adapter.down.T) @ adapter.up.T + adapter.bias
    residual = (fitted - (x @ a.T + 0.5)).pow(2).mean()
    assert residual < 1e-3                                     # only the 0.01 directions are lost
    one = solve_adapter(moments, rank=1, ridge=1e-9)
    worse = ((x @ one.down.T) @ one.up.T + one.bias - (x @ a.T + 0.5)).pow(2).mean()
    assert worse > 100 * residual


@pytest.mark.parametrize("budget", [1.0, 0.75, 0.5, 0.3])
def test_random_skip_gates_skip_what_the_budget_leaves_unpaid(budget):
    depth = DepthAccounting(num_layers=10, skip_cost=0.2, min_layers=2)
    gates = random_skip_gates(3, 7, depth, torch.full((3,), budget), torch.Generator().manual_seed(0))
    assert gates.shape == (3, 7, 10)
    assert (gates[..., :2] == 1).all()                      # forced layers always run
    compute = (gates + (1 - gates) * depth.skip_cost).mean(-1)
    limit = depth.effective_budget(budget)
    assert (compute <= limit + 1e-6).all()
    assert (compute > limit - (1 - depth.skip_cost) / depth.num_layers - 1e-6).all()   # no layer to spare
    skipped = (gates == 0).sum(-1)
    assert (skipped == skipped.flatten()[0]).all()           # same count, different layers
    if 0 < skipped.flatten()[0] < 8:
        assert len({tuple(row.tolist()) for row in gates.reshape(-1, 10)}) > 1


def test_padding_of_ragged_windows_is_left_out_of_the_fit():
    from conftest import build_model, random_ids
    from anee_fast import LLM
    from anee_fast.training.adapter_ridge import fit_ridge_adapters
    from anee_fast.training.gated_forward import GatedForward
    llm = LLM(build_model("llama_gqa", num_layers=3), backend="reference")
    forward = GatedForward(llm.weights)
    windows = [random_ids(build_model("llama_gqa", num_layers=3), n, seed=n).tolist() for n in (9, 14)]
    fits = [fit_ridge_adapters(forward, windows, llm.depth, rank=4, passes=1, budget_range=(1.0, 1.0),
                               batch=batch, pad_id=5, progress=False) for batch in (1, 2)]
    for a, b in zip(*fits):      # the map, not its factors (eigenvectors have a free sign)
        torch.testing.assert_close(a.up @ a.down, b.up @ b.down, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.bias, b.bias, atol=1e-4, rtol=1e-4)
