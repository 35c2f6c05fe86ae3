"""policy_step of every compiled backend against the reference (see op_cases)."""
import pytest
import torch

from anee_fast.ops import reference as ref
from op_cases import target  # noqa: F401  (fixture)


@pytest.mark.parametrize("rows", [1, 7, 83, 1100])        # 1100: more than one program / block
@pytest.mark.parametrize("forced,stop_code", [(False, 2), (False, 1), (True, 2)])
def test_policy_step_equals_the_rule_exactly(target, rows, forced, stop_code):
    """Actions, the PROCESS mask, stopped, spent and budget_left (float32) equal the reference
    bit for bit, budget boundaries included; the other layers' actions stay untouched."""
    g = torch.Generator().manual_seed(rows + stop_code + 10 * forced)
    L, layer, skip_cost = 7, 3, 0.0877
    proposed = torch.randint(0, 3, (rows,), generator=g, dtype=torch.int8)
    spent = torch.randint(0, 4, (rows,), generator=g).float() + skip_cost * torch.randint(0, 3, (rows,), generator=g)
    stopped = torch.rand(rows, generator=g) < 0.2
    commitment = 1 + 2 * skip_cost
    # Every third token sits exactly on its budget: spent + commitment == allowed.
    allowed = torch.where(torch.arange(rows) % 3 == 0, spent + commitment,
                          spent + commitment + torch.randn(rows, generator=g))
    limit = allowed - 1e-6 * torch.rand(rows, generator=g)
    budget_left = torch.full((rows,), float("nan"))                  # written, not read
    actions = torch.full((rows, L), 7, dtype=torch.int8)
    dev = target.device
    state = [t.to(dev) for t in (proposed, spent, stopped, allowed, limit, budget_left, actions)]
    expect = [t.clone() for t in state]
    got_process = target.ops.policy_step(*state, layer, commitment, skip_cost, stop_code, forced)
    expect_process = ref.policy_step(*expect, layer, commitment, skip_cost, stop_code, forced)
    assert torch.equal(got_process, expect_process)
    for got, exp in zip(state[1:], expect[1:]):     # spent, ..., budget_left, actions
        assert torch.equal(got, exp)
    assert torch.equal(expect[5], (expect[4] - expect[1]) / L)       # (limit - spent) / L
    assert (state[6][:, [0, 1, 2, 4, 5, 6]] == 7).all()
    if rows > 1:        # the inputs exercise both outcomes
        assert expect_process.any() and (forced or not expect_process.all())


@pytest.mark.parametrize("rows", [1, 83, 1100])
@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("rule", ["target", "reference"])
def test_policy_step_starts_the_state_at_layer_0(target, rows, forced, rule):
    """At layer 0 spent and stopped are written, not read: NaN-poisoned spent and all-stopped
    tokens give what a zero, not-stopped state gives (budget_left included)."""
    ops = target.ops if rule == "target" else ref
    g = torch.Generator().manual_seed(rows + forced)
    proposed = torch.randint(0, 3, (rows,), generator=g, dtype=torch.int8)
    allowed = 2.0 + torch.rand(rows, generator=g) * 3     # some tokens can run layer 0, some not
    limit = allowed - 1e-6
    commitment = 3.5
    dev = target.device
    poisoned = [t.to(dev) for t in (proposed, torch.full((rows,), float("nan")),
                                    torch.ones(rows, dtype=torch.bool), allowed, limit,
                                    torch.full((rows,), float("nan")),
                                    torch.full((rows, 5), 7, dtype=torch.int8))]
    fresh = [t.to(dev) for t in (proposed, torch.zeros(rows), torch.zeros(rows, dtype=torch.bool),
                                 allowed, limit, torch.zeros(rows),
                                 torch.full((rows, 5), 7, dtype=torch.int8))]
    got = ops.policy_step(*poisoned, 0, commitment, 0.25, 2, forced)
    expect = ref.policy_step(*fresh, 0, commitment, 0.25, 2, forced)
    assert torch.equal(got, expect)
    for g_t, e_t in zip(poisoned[1:], fresh[1:]):        # spent, ..., budget_left, actions
        assert torch.equal(g_t, e_t)
    if rows > 1 and not forced:
        assert expect.any() and not expect.all()
