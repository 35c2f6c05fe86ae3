"""The budget-conditioned trained controller: its files, its loading paths and its budget rule."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

from anee_fast import EXIT, LLM, PROCESS, SKIP, SamplingParams
from anee_fast.compat.anee import ANEEConfig, ANEEWrapper
from anee_fast.control.anee_mlp import ANEEMLPController
from anee_fast.control.base import LayerContext
from anee_fast.control.controllers import StaticController
from anee_fast.control.registry import make_controller
from anee_fast.ops import reference
from anee_fast.ops.backends import ops_for

from anee_fast.control.depth_policy import DepthAccounting
from anee_fast.control.trained import BudgetConditionedController, shipped_controller_path
from anee_fast.ops.reference import affordable_fraction

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


def torch_rule(controller, ctx):
    """The controller's proposals as propose() computed them before the budget_controller op,
    about 110 tensor ops per layer: the oracle of the op's controller."""
    net, L = controller.net, ctx.num_layers
    h, h_prev, left = ctx.h.float(), ctx.h_prev.float(), ctx.budget_left.float()
    remaining = L - ctx.layer
    affordable = ((left * L - remaining * ctx.skip_cost) / (remaining * (1.0 - ctx.skip_cost))
                  ).clamp(-1.0, 2.0)
    scalars = torch.stack([torch.log1p(h.norm(dim=-1)), torch.log1p((h - h_prev).norm(dim=-1)),
                           torch.log1p(h.var(dim=-1)), F.cosine_similarity(h, h_prev, dim=-1),
                           ctx.budget.float(), left, affordable,
                           torch.full_like(left, (L - ctx.layer) / L)], dim=-1)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    layer = torch.full((h.shape[0],), ctx.layer, dtype=torch.long, device=h.device)
    with torch.no_grad():
        x = (scalars - net.scalar_mean) / net.scalar_std
        z = F.relu(net.inp(torch.cat([x, net.proj(normed)], dim=-1)) + net.layer_embed(layer))
        logit = net.out(F.relu(net.hidden(z))).squeeze(-1)
    process = logit > 0
    fallback = controller.config.get("static_fallback")
    if fallback is not None:
        order, D = fallback["order"], len(fallback["order"])
        limit = ctx.budget.float() * L - (L - D) - D * ctx.skip_cost
        counts = D - torch.floor(limit / (1.0 - ctx.skip_cost) + 1e-6).clamp(0, D)
        base = order.index(ctx.layer) >= counts if ctx.layer in order else torch.ones_like(process)
        trusted = ((logit.abs() > fallback["margin"]) & (ctx.budget >= fallback.get("net_min_budget", 0))
                   & (ctx.budget <= fallback.get("net_max_budget", 1)))
        process = torch.where(trusted, process, base)
    leave = ctx.budget_left < controller.exit_threshold
    process = (process | (affordable >= 1.0 - 1e-6)) & ~leave
    return torch.where(leave, EXIT, torch.where(process, PROCESS, SKIP)).to(torch.int8)


class TorchRuleController(BudgetConditionedController):
    """A trained controller proposing through torch_rule (the oracle)."""

    def propose(self, ctx):
        return torch_rule(self, ctx)


class OpsController(BudgetConditionedController):
    """A trained controller proposing through a given backend's op, whatever the engine's."""

    def __init__(self, net, config, ops):
        super().__init__(net, config)
        self.ops = ops

    def propose(self, ctx):
        ctx.ops = self.ops
        return super().propose(ctx)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_propose_is_one_op_with_the_torch_rules_proposals(backend):
    """Every backend's budget_controller proposes what the tensor-op rule did, at every layer,
    budget, static fallback and EXIT threshold."""
    ops = ops_for(backend)
    c = trained_like(3)
    with torch.no_grad():                         # logits spread over both signs and the margin
        c.net.out.weight.mul_(0.05)
    tried = set()
    for fallback in (None, {"order": [3, 1, 4, 2], "margin": 0.5},
                     {"order": [3, 1, 4, 2], "margin": 0.5, "net_min_budget": 0.5},
                     {"order": [3, 1, 4, 2], "margin": 0.5, "net_min_budget": 0.5,
                      "net_max_budget": 0.7}):
        c.config["static_fallback"] = fallback
        for threshold in (0.0, 0.2):
            c.exit_threshold = threshold
            for layer in range(1, L):
                for budget, left in ((1.0, (L - layer) / L), (0.6, 0.35), (0.4, 0.15)):
                    ctx = context(n=16, layer=layer, budget=budget, budget_left=left, seed=layer)
                    ctx.budget_left[::3] *= 0.5
                    ctx.ops = ops
                    got = c.propose(ctx)
                    assert torch.equal(got, torch_rule(c, ctx)), (fallback, threshold, layer, budget)
                    tried |= set(got.tolist())
    assert tried == {PROCESS, SKIP, EXIT}


@pytest.mark.slow
def test_the_shipped_controller_decides_as_before_its_op():
    """The shipped controller ("learned", with its static fallback) through LLM.generate on the
    embedded model: the native op, the reference op and the former tensor-op rule take the same
    actions at every token and layer."""
    llm = LLM(backend="native")
    shipped = make_controller("learned")
    controllers = {"native": shipped,
                   "reference": OpsController(shipped.net, shipped.config, reference),
                   "torch rule": TorchRuleController(shipped.net, shipped.config)}
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for budget in (1.0, 0.75, 0.5):
        traces = {name: llm.generate("The capital of France is", params, energy_budget=budget,
                                     controller=c)[0].trace.actions
                  for name, c in controllers.items()}
        assert torch.equal(traces["native"], traces["torch rule"]), budget
        assert torch.equal(traces["reference"], traces["torch rule"]), budget
        if budget < 1:
            assert (traces["native"] == SKIP).any()


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
    write(static_fallback={"order": [1, 2], "margin": 1.0, "net_min_budget": 1.5})
    with pytest.raises(ValueError, match="static_fallback.net_min_budget must"):
        BudgetConditionedController.load(json_path)
    write(static_fallback={"order": [1, 2], "margin": 1.0, "net_max_budget": -0.1})
    with pytest.raises(ValueError, match="static_fallback.net_max_budget must"):
        BudgetConditionedController.load(json_path)
    write(static_fallback={"order": [1, 2], "margin": 1.0, "net_min_budget": 0.8,
                           "net_max_budget": 0.6})
    with pytest.raises(ValueError, match="net_min_budget 0.8 is above net_max_budget 0.6"):
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
        for band in ((0.9, 1.0), (0.2, budget - 0.1)):   # always sure, but not at this budget
            untrusted = trained_like()
            untrusted.config["static_fallback"] = {"order": order, "margin": 0.0,
                                                   "net_min_budget": band[0],
                                                   "net_max_budget": band[1]}
            _, got = llm.score(ids, energy_budget=budget, controller=untrusted, return_trace=True)
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
