"""Distillation's pieces: the relaxed gate decides what the engine's controller decides, and the
KL's gradient reaches both the adapters and the controller net."""
import pytest
import torch

from anee_fast import LLM
from anee_fast.control.trained import BudgetConditionedController
from anee_fast.training.distillation import (RelaxedGateController, collate, distill_step,
                                             gated_run, kl_per_token)
from anee_fast.training.gated_forward import GatedForward
from conftest import build_model, random_ids

from test_gated_forward import random_adapters


def controller_following(order, L, hidden, margin):
    c = BudgetConditionedController.new(L, hidden, "tiny")
    c.config["static_fallback"] = {"order": order, "margin": margin}
    return c


@pytest.mark.parametrize("margin,band", [
    (100.0, None),          # the net is never sure enough: the noise never wins
    (0.0, (0.8, 1.0)),      # the net always sure, but trusted from budget 0.8 only (budgets
    (0.0, (0.5, 0.65)),     # here: 0.7 and 0.45), or from 0.5 to 0.65 only
])
def test_the_relaxed_gate_runs_what_the_engine_runs(margin, band):
    model = build_model("llama_gqa", num_layers=6)
    L, hidden = 6, model.config.hidden_size
    llm = LLM(model, backend="reference", min_layers=1)
    llm.set_adapters(random_adapters(L, hidden, 3, seed=0))
    order = [4, 2, 5, 1, 3]
    controller = controller_following(order, L, hidden, margin=margin)
    if band is not None:
        controller.config["static_fallback"].update(net_min_budget=band[0],
                                                    net_max_budget=band[1])
    relaxed = RelaxedGateController(controller.net, 0.5, torch.Generator().manual_seed(0),
                                    controller.config["static_fallback"])
    ids = torch.stack([random_ids(model, 11, seed=s) for s in (1, 2)])
    budgets = torch.tensor([0.7, 0.45])
    fwd = GatedForward(llm.weights)
    adapters = [a.tensors() for a in llm.weights.adapters]
    with torch.no_grad():
        h, expected, realised = gated_run(fwd, ids, llm.depth, budgets, adapters, relaxed)
        logits = fwd.logits(h)
    for row in range(2):
        ref, trace = llm.score(ids[row].tolist(), energy_budget=float(budgets[row]),
                               controller=controller, return_trace=True)
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(realised[row], trace.compute.float(), atol=1e-6, rtol=0)
    assert (realised < 1).all()                                        # something was skipped


def test_the_kl_gradient_reaches_adapters_and_net():
    model = build_model("llama_gqa", num_layers=6)
    L, hidden = 6, model.config.hidden_size
    llm = LLM(model, backend="reference", min_layers=1)
    llm.set_adapters(random_adapters(L, hidden, 3, seed=0))
    controller = controller_following([4, 2, 5, 1, 3], L, hidden, margin=0.5)
    net = controller.net.train()
    relaxed = RelaxedGateController(net, 0.5, torch.Generator().manual_seed(0),
                                    controller.config["static_fallback"])
    fwd = GatedForward(llm.weights)
    params = [[torch.nn.Parameter(t.clone()) for t in a.tensors()] for a in llm.weights.adapters]
    windows = [random_ids(model, n, seed=n).tolist() for n in (9, 12)]
    ids, mask = collate(windows, pad_id=0)
    assert mask.sum(1).tolist() == [9, 12] and ids[0, 9:].eq(0).all()
    with torch.no_grad():
        teacher = fwd.final_normed(fwd.run(ids, lambda l, h, hp: torch.ones(ids.shape)))
    loss, kl, over, compute = distill_step(fwd, ids, mask, teacher, llm.depth,
                                           torch.tensor([0.6, 0.5]), params, relaxed, mu=1.0)
    loss.backward()
    assert kl > 0 and compute < 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params[3])
    assert net.out.weight.grad is not None and net.out.weight.grad.abs().sum() > 0


def test_kl_per_token_is_zero_for_the_same_logits_and_positive_otherwise():
    x = torch.randn(3, 5, 7)
    assert kl_per_token(x, x).abs().max() < 1e-6
    assert (kl_per_token(x, x.flip(-1)) > 0).all()
