"""The budget-conditioned trained controller: its files, its loading paths and its budget rule."""
import json

import pytest
import torch
from conftest import build_model

from anee_fast import LLM, PROCESS, SKIP
from anee_fast.compat.anee import ANEEConfig, ANEEWrapper
from anee_fast.control.anee_mlp import ANEEMLPController
from anee_fast.control.base import LayerContext
from anee_fast.control.controllers import StaticController
from anee_fast.control.registry import make_controller
from anee_fast.ops import reference

from anee_fast.control.depth_policy import DepthAccounting
from anee_fast.control.trained import (BudgetConditionedController, affordable_fraction,
                                          shipped_controller_path)

L, HIDDEN = 5, 48


def trained_like(seed=0):
    """A controller with random (not zero) weights, so proposals depend on the input."""
    torch.manual_seed(seed)
    c = BudgetConditionedController.new(L, HIDDEN, "tiny llama_gqa", width=16, proj_dim=4)
    with torch.no_grad():
        for p in c.net.parameters():
            p.normal_(0.0, 1.0)
    return c


def context(n=12, layer=2, budget=0.6, budget_left=0.4, skip_cost=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, HIDDEN, generator=g)
    return LayerContext(layer=layer, num_layers=L, h=h, h_prev=h + 0.3 * torch.randn(n, HIDDEN, generator=g),
                        budget_left=torch.full((n,), budget_left), budget=torch.full((n,), budget),
                        skip_cost=skip_cost, ops=reference)


def test_save_load_round_trip_by_directory_json_and_safetensors(tmp_path):
    c = trained_like()
    ctx = context()
    want = c.propose(ctx)
    assert set(want.tolist()) == {PROCESS, SKIP}        # the test input exercises both outputs
    json_path = c.save(tmp_path / "ctrl", extra={"training": {"note": "test"}})
    assert json_path == tmp_path / "ctrl" / "controller.json"
    assert json.loads(json_path.read_text())["training"] == {"note": "test"}
    stem = c.save(tmp_path / "flat.safetensors")
    for path in (tmp_path / "ctrl", json_path, stem, tmp_path / "flat.safetensors"):
        loaded = make_controller(str(path))
        assert isinstance(loaded, BudgetConditionedController)
        assert torch.equal(loaded.propose(ctx), want)


def test_a_token_that_can_pay_for_every_remaining_layer_processes():
    c = trained_like()
    n = 12
    ctx = context(n=n, layer=2, budget=1.0, budget_left=1.0)
    assert float(affordable_fraction(ctx.budget_left, 2, L, 0.1)[0]) > 1.0
    assert (c.propose(ctx) == PROCESS).all()
    c.exit_threshold = 0.5
    assert (c.propose(context(budget_left=0.3)) == 2).all()      # EXIT under the threshold


def test_bad_files_fail_with_clear_errors(tmp_path):
    c = trained_like()
    json_path = c.save(tmp_path / "c")
    config = json.loads(json_path.read_text())

    def write(**changes):
        json_path.write_text(json.dumps(dict(config, **changes)))

    with pytest.raises(FileNotFoundError, match="not found"):
        BudgetConditionedController.load(tmp_path / "missing")
    write(format="something else")
    with pytest.raises(ValueError, match="format must be"):
        BudgetConditionedController.load(json_path)
    write(version=99)
    with pytest.raises(ValueError, match="version 99"):
        BudgetConditionedController.load(json_path)
    write(features=["log_norm"])
    with pytest.raises(ValueError, match="features"):
        BudgetConditionedController.load(json_path)
    write(static_fallback={"order": [1, 1], "margin": 2.0})
    with pytest.raises(ValueError, match="static_fallback.order"):
        BudgetConditionedController.load(json_path)
    write(static_fallback={"order": [1, 2], "margin": -1})
    with pytest.raises(ValueError, match="static_fallback.margin"):
        BudgetConditionedController.load(json_path)
    write(width=17)
    with pytest.raises(ValueError, match="do not match"):
        BudgetConditionedController.load(json_path)
    json_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BudgetConditionedController.load(json_path)
    write()
    (tmp_path / "c" / "controller.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read controller weights"):
        BudgetConditionedController.load(json_path)
    (tmp_path / "c" / "controller.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        make_controller(str(json_path))


def test_runs_in_the_engine_within_budget_and_names_the_model_on_a_shape_mismatch(tmp_path):
    llm = LLM(build_model("llama_gqa", num_layers=L), min_layers=1)
    depth = llm.depth
    path = trained_like().save(tmp_path / "c")
    ids = list(range(3, 40))
    for budget in (1.0, 0.7, 0.4, 0.0):
        _, trace = llm.score(ids, energy_budget=budget, controller=str(path), return_trace=True)
        limit = max(budget, DepthAccounting(L, depth.skip_cost, 1, 0).floor)
        assert float(trace.compute.max()) <= limit + 1e-6
        if budget == 1.0:
            assert (trace.actions == PROCESS).all()
    other = LLM(build_model("llama_gqa", num_layers=3), min_layers=1)
    with pytest.raises(ValueError, match="trained for tiny llama_gqa"):
        other.score(ids, energy_budget=0.5, controller=str(path))


def test_the_static_fallback_follows_the_base_set_unless_the_net_is_sure(tmp_path):
    llm = LLM(build_model("llama_gqa", num_layers=L), min_layers=1)
    depth = llm.depth
    order = [3, 1, 4, 2]                         # the decidable layers, the first to skip first
    ids = list(range(3, 40))
    plain = trained_like()
    differs = False
    for budget in (0.8, 0.5, 0.3):
        k = DepthAccounting(L, depth.skip_cost, 1, 0).processable(budget)
        static = StaticController([SKIP if layer in order[:len(order) - k] else PROCESS
                                   for layer in range(L)])
        sure = trained_like()
        sure.config["static_fallback"] = {"order": order, "margin": 1e9}   # never sure enough
        _, want = llm.score(ids, energy_budget=budget, controller=static, return_trace=True)
        _, got = llm.score(ids, energy_budget=budget, controller=sure, return_trace=True)
        assert torch.equal(got.actions, want.actions)
        _, alone = llm.score(ids, energy_budget=budget, controller=plain, return_trace=True)
        differs |= not torch.equal(alone.actions, want.actions)
        always = trained_like()
        always.config["static_fallback"] = {"order": order, "margin": 0.0}  # always sure
        _, want = llm.score(ids, energy_budget=budget, controller=plain, return_trace=True)
        _, got = llm.score(ids, energy_budget=budget, controller=always, return_trace=True)
        assert torch.equal(got.actions, want.actions)
    assert differs                                # the net alone departs from the base set
    saved = BudgetConditionedController.load(sure.save(tmp_path / "fb"))
    assert saved.config["static_fallback"] == {"order": order, "margin": 1e9}


def test_anee_config_loads_both_formats(tmp_path):
    model = build_model("gpt2", num_layers=L)
    new_path = BudgetConditionedController.new(L, HIDDEN, "tiny gpt2").save(tmp_path / "new")
    wrapper = ANEEWrapper(ANEEConfig(model_name=model, controller_type="learned",
                                     controller_path=str(new_path), exit_budget_threshold=0.2))
    assert isinstance(wrapper.controller, BudgetConditionedController)
    assert wrapper.controller.exit_threshold == 0.2
    old = ANEEMLPController(hidden_dim=8)
    torch.save({f"net.{k}": v for k, v in old.net.state_dict().items()}, tmp_path / "old.pt")
    wrapper = ANEEWrapper(ANEEConfig(model_name=model, controller_type="learned",
                                     controller_path=str(tmp_path / "old.pt")))
    assert isinstance(wrapper.controller, ANEEMLPController)


@pytest.mark.slow
def test_the_shipped_controller_loads_and_keeps_every_budget():
    config = json.loads(shipped_controller_path().read_text())
    assert config["training"]["heldout"], "the shipped controller records its held-out check"
    llm = LLM()
    controller = make_controller("learned")
    assert isinstance(controller, BudgetConditionedController)
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    for budget in (0.75, 0.5, 0.25):
        _, trace = llm.score(ids, energy_budget=budget, controller="learned", return_trace=True)
        limit = llm.depth.effective_budget(budget)
        assert float(trace.compute.max()) <= limit + 1e-6
        assert float(trace.compute.mean()) > limit - 0.1      # it spends its budget, not nothing
    tiny = LLM(build_model("llama_gqa", num_layers=3))
    with pytest.raises(ValueError, match="SmolLM2"):
        tiny.score([3, 4, 5], energy_budget=0.5, controller="learned")
