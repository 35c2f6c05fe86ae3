"""Energy budget: enforced per token for every controller, reported honestly.

For budgets b in {0, .1, .25, .5, .75, 1} and every kind of controller:
- no token spends more than max(b, floor), floor = cost of the forced layers with the rest SKIPs;
- trace.compute equals (n_process + (L - n_process) * skip_cost) / L from trace.actions;
- min_layers / always_last are PROCESS; EXIT is sticky;
- the trace is replayable: its actions as a fixed matrix give the same logits (and, for
  generate, the same greedy tokens);
- decisions are per token: one prefill and chunk_size=1 choose the same actions.
"""
import pytest
import torch
from torch import nn

from anee_fast import EXIT, LLM, PROCESS, SKIP, SamplingParams
from anee_fast.control.base import Controller, LayerContext
from anee_fast.control.controllers import BudgetController, HeuristicController

from anee_fast.control.depth_policy import DepthAccounting, DepthPolicy
from anee_fast.ops import reference
from conftest import build_model, random_ids

BUDGETS = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
NUM_LAYERS = 4
# (architecture, min_layers, always_last)
SETUPS = [("llama_gqa", 2, 0), ("gpt2", 1, 1), ("qwen2", 0, 0)]
CONTROLLERS = ["budget", "heuristic", "heuristic_0.8", "static", "static_exit", "learned"]


class _ANEEController(nn.Module):
    """The ANEE 0.4 controller module layout: state_dict keys net.0.*, net.2.*."""

    def __init__(self, state_dim=6, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, 3))


@pytest.fixture(scope="module")
def learned_path(tmp_path_factory):
    torch.manual_seed(1234)
    module = _ANEEController()
    path = tmp_path_factory.mktemp("controller") / "anee_controller.pt"
    torch.save(module.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def llms():
    made = {}

    def get(arch, min_layers, always_last):
        key = (arch, min_layers, always_last)
        if key not in made:
            made[key] = LLM(build_model(arch, num_layers=NUM_LAYERS), min_layers=min_layers,
                            always_last=always_last)
        return made[key]
    return get


def controller_for(name, learned_path):
    return {"budget": "budget", "heuristic": "heuristic",
            "heuristic_0.8": HeuristicController(skip_saturation=0.8, exit_saturation=0.9),
            "static": [PROCESS, SKIP, PROCESS, PROCESS],
            "static_exit": [PROCESS, PROCESS, EXIT, PROCESS],
            "learned": learned_path}[name]


def floor_of(llm, min_layers, always_last) -> float:
    L, s = llm.num_layers, llm.weights.skip_cost()
    forced = min_layers + always_last
    return (forced + (L - forced) * s) / L


def check_trace(trace, llm, budget, min_layers, always_last, num_tokens):
    """The invariants every trace obeys, whatever controller made it."""
    L, s = llm.num_layers, llm.weights.skip_cost()
    acts = trace.actions
    assert acts.dtype == torch.int8 and acts.shape == (num_tokens, L)
    assert trace.compute.shape == (num_tokens,)
    assert ((acts >= 0) & (acts <= 2)).all()
    # Spending limit.
    limit = max(budget, floor_of(llm, min_layers, always_last))
    assert (trace.compute <= limit + 1e-6).all(), (trace.compute.max(), limit)
    # Compute is what the actions cost.
    n_process = (acts == PROCESS).sum(1).float()
    torch.testing.assert_close(trace.compute, (n_process + (L - n_process) * s) / L)
    # Forced layers run.
    assert (acts[:, :min_layers] == PROCESS).all()
    if always_last:
        assert (acts[:, L - always_last:] == PROCESS).all()
    # EXIT is sticky.
    exited = torch.cummax((acts == EXIT).int(), dim=1).values.bool()
    assert (acts[exited] == EXIT).all()
    assert trace.budget == budget
    assert trace.skip_cost == pytest.approx(s)
    assert trace.mean_compute == pytest.approx(float(trace.compute.mean()), abs=1e-6)


@pytest.mark.parametrize("setup", SETUPS, ids=[f"{a}-min{m}-last{k}" for a, m, k in SETUPS])
@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_score_respects_budget_and_is_replayable(llms, learned_path, setup, controller, budget):
    arch, min_layers, always_last = setup
    llm = llms(arch, min_layers, always_last)
    model = build_model(arch, num_layers=NUM_LAYERS)
    ctrl = controller_for(controller, learned_path)
    ids = random_ids(model, 23, seed=21)
    logits, trace = llm.score(ids, energy_budget=budget, controller=ctrl, return_trace=True)
    check_trace(trace, llm, budget, min_layers, always_last, 23)
    # Replay: the recorded actions, as a fixed matrix, reproduce the logits.
    replay, replay_trace = llm.score(ids, actions=trace.actions, return_trace=True)
    assert (replay - logits).abs().max() <= 1e-5
    assert torch.equal(replay_trace.actions, trace.actions)
    torch.testing.assert_close(replay_trace.compute, trace.compute)
    # Decisions are per token: token by token through the decode path gives the same actions.
    logits_1, trace_1 = llm.score(ids, energy_budget=budget, controller=ctrl, chunk_size=1,
                                  return_trace=True)
    assert torch.equal(trace_1.actions, trace.actions)
    assert (logits_1 - logits).abs().max() <= 1e-5


@pytest.mark.parametrize("setup", SETUPS, ids=[f"{a}-min{m}-last{k}" for a, m, k in SETUPS])
@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("budget", [0.0, 0.25, 0.5, 1.0])
def test_generate_respects_budget_and_is_replayable(llms, learned_path, setup, controller, budget):
    arch, min_layers, always_last = setup
    llm = llms(arch, min_layers, always_last)
    model = build_model(arch, num_layers=NUM_LAYERS)
    prompts = [random_ids(model, n, seed=30 + n).tolist() for n in (7, 1, 12)]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    outs = llm.generate(prompts, params, energy_budget=budget,
                        controller=controller_for(controller, learned_path))
    assert llm.engine.block_manager.num_used == 0
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert len(out.token_ids) == 5
        assert out.finish_reason == "length"
        # Every token the model processed: the prompt and all generated tokens but the last.
        processed = prompt + out.token_ids[:-1]
        check_trace(out.trace, llm, budget, min_layers, always_last, len(processed))
        assert out.trace.num_prompt_tokens == len(prompt)
        # Replay: scoring the processed tokens with the trace's actions reproduces the greedy picks.
        logits = llm.score(processed, actions=out.trace.actions)
        assert logits[len(prompt) - 1:].argmax(-1).tolist() == out.token_ids


@pytest.mark.parametrize("setup", SETUPS, ids=[f"{a}-min{m}-last{k}" for a, m, k in SETUPS])
def test_budget_controller_spends_what_it_may(llms, setup):
    """The "budget" controller runs layers front to back while the budget allows: it spends at
    most max(b, floor) and less than one more layer below it; compute grows with b."""
    arch, min_layers, always_last = setup
    llm = llms(arch, min_layers, always_last)
    model = build_model(arch, num_layers=NUM_LAYERS)
    L, s = llm.num_layers, llm.weights.skip_cost()
    floor = floor_of(llm, min_layers, always_last)
    ids = random_ids(model, 9, seed=40)
    previous = -1.0
    for budget in BUDGETS:
        _, trace = llm.score(ids, energy_budget=budget, controller="budget", return_trace=True)
        limit = max(budget, floor)
        assert (trace.compute <= limit + 1e-6).all()
        assert (trace.compute > limit - (1 - s) / L - 1e-6).all()
        # Every token of a budget-only controller makes the same choice.
        assert (trace.actions == trace.actions[0]).all()
        assert trace.mean_compute >= previous
        previous = trace.mean_compute
    _, full = llm.score(ids, energy_budget=1.0, controller="budget", return_trace=True)
    assert (full.actions == PROCESS).all() and torch.equal(full.compute, torch.ones(9))
    _, empty = llm.score(ids, energy_budget=0.0, controller="budget", return_trace=True)
    torch.testing.assert_close(empty.compute, torch.full((9,), floor))


def test_min_layers_and_always_last_bound_the_floor():
    """min_layers = L: every layer is forced, the budget cannot bite; min_layers 0 at budget 0:
    every token spends exactly L SKIPs."""
    model = build_model("llama_gqa", num_layers=NUM_LAYERS)
    ids = random_ids(model, 7, seed=41)
    llm = LLM(model, min_layers=NUM_LAYERS)
    _, trace = llm.score(ids, energy_budget=0.0, return_trace=True)
    assert (trace.actions == PROCESS).all()
    assert torch.equal(trace.compute, torch.ones(7))
    llm = LLM(model, min_layers=0)
    _, trace = llm.score(ids, energy_budget=0.0, return_trace=True)
    assert (trace.actions == EXIT).all()
    torch.testing.assert_close(trace.compute, torch.full((7,), llm.weights.skip_cost()))
    llm = LLM(model, min_layers=0, always_last=1)
    _, trace = llm.score(ids, energy_budget=0.0, return_trace=True)
    # With a forced last layer the stop is a run of SKIPs, then the last layer runs.
    assert (trace.actions[:, :-1] == SKIP).all() and (trace.actions[:, -1] == PROCESS).all()


def test_skip_cost_is_the_kv_share_of_layer_bytes():
    """skip_cost for GPT-2-small layer shapes is about 1/6, for Llama-3.2-1B proportions about 1/30,
    each equal to the K/V (+ attention norm) share computed from the shapes here."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h, inner = 768, 3072
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=h, n_layer=1, n_head=12, vocab_size=101,
                                      n_positions=32, bos_token_id=1, eos_token_id=2)).eval()
    kv = 2 * h * h + 2 * h + 2 * h                      # K, V weights and biases, ln_1
    total = (3 * h * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h) + 4 * h
    cost = LLM(gpt2, min_layers=1).weights.skip_cost()     # 1 layer: min_layers <= L
    assert cost == pytest.approx(kv / total, rel=1e-9)
    assert abs(cost - 1 / 6) < 0.005

    h, inter, heads, kv_heads = 2048, 8192, 32, 8
    d = h // heads
    with torch.device("meta"):        # the proportions need no memory
        llama = LlamaForCausalLM(LlamaConfig(hidden_size=h, intermediate_size=inter,
                                             num_attention_heads=heads, num_key_value_heads=kv_heads,
                                             num_hidden_layers=1, vocab_size=101,
                                             tie_word_embeddings=True))
    from anee_fast.model.packing import pack_hf_model
    cost = pack_hf_model(llama).skip_cost()
    kv = 2 * h * kv_heads * d + h                       # K, V and the input RMSNorm
    total = 2 * h * h + 2 * h * kv_heads * d + 3 * h * inter + 2 * h
    assert cost == pytest.approx(kv / total, rel=1e-9)
    assert 0.03 < cost < 0.04


@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("budgets", [(0.25, 0.6, 0.1), (0.6, 1.0, 0.25)])
def test_ragged_batch_decides_like_each_sequence_alone(llms, learned_path, controller, budgets):
    """Each sequence of the batch has its own budget: a step that applied one row's budget to
    every row would differ from the sequence scored alone."""
    llm = llms("llama_gqa", 2, 0)
    model = build_model("llama_gqa", num_layers=NUM_LAYERS)
    ctrl = controller_for(controller, learned_path)
    seqs = [random_ids(model, n, seed=60 + n) for n in (13, 1, 29)]
    logits, traces = llm.score(seqs, energy_budget=list(budgets), controller=ctrl,
                               return_trace=True, chunk_size=4)
    for ids, budget, lg, trace in zip(seqs, budgets, logits, traces):
        alone, alone_trace = llm.score(ids, energy_budget=budget, controller=ctrl, return_trace=True)
        assert torch.equal(trace.actions, alone_trace.actions)
        assert (lg - alone).abs().max() <= 1e-5
        assert trace.budget == budget
        check_trace(trace, llm, budget, 2, 0, len(ids))


class _ExplicitBudgetRule(Controller):
    """The budget controller's rule at threshold 0, computed: EXIT where budget_left < 0."""

    def propose(self, ctx):
        return torch.where(ctx.budget_left < 0, EXIT, PROCESS).to(torch.int8)


@pytest.mark.parametrize("min_layers,always_last", [(0, 0), (2, 0), (1, 2)])
@pytest.mark.parametrize("skip_cost", [0.0, 0.1, 0.37])
def test_budget_controller_at_threshold_0_needs_no_op(min_layers, always_last, skip_cost):
    """BudgetController() proposes the policy's preset all-PROCESS tensor (no op per layer, not
    even budget_left), and that gives exactly the actions and compute of computing its rule."""
    N, L = 257, 12
    g = torch.Generator().manual_seed(int(100 * skip_cost) + min_layers)
    budget = torch.rand(N, generator=g)
    budget[:L + 1] = torch.arange(L + 1) / L          # budgets on layer boundaries
    h = torch.randn(N, 4)
    results = []
    for controller in (BudgetController(), _ExplicitBudgetRule()):
        depth = DepthAccounting(L, skip_cost, min_layers, always_last)
        policy = DepthPolicy(N, depth, "cpu", reference, budget_terms=depth.budget_terms(budget),
                             controller=controller)
        for layer in range(L):
            policy.decide(layer, h, h)
        results.append((policy.actions, policy.spent))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert (results[0][0] != PROCESS).any() and (results[0][0] == PROCESS).any()

    depth = DepthAccounting(L, skip_cost)
    preset = DepthPolicy(N, depth, "cpu", reference, budget_terms=depth.budget_terms(budget),
                         controller=BudgetController())
    ctx = LayerContext(layer=0, num_layers=L, h=h, h_prev=h, budget_left=None,
                       all_process=preset.no_proposal, ops=reference)
    assert BudgetController().propose(ctx) is preset.no_proposal     # budget_left never read


class _BudgetLeftRecorder(Controller):
    """Records the budget_left each layer shows it; proposes codes that vary by token and layer."""

    def __init__(self):
        self.seen = []

    def propose(self, ctx):
        self.seen.append(ctx.budget_left.clone())
        return ((torch.arange(ctx.h.shape[0]) + ctx.layer) % 3).to(torch.int8)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("min_layers,always_last", [(0, 0), (2, 1)])
def test_controllers_see_the_budget_left_of_the_spent_so_far(backend, min_layers, always_last):
    """policy_step writes budget_left for the next layer: a controller sees, bit for bit, what
    (limit - spent) / L gives with spent as the previous layer left it (the whole budget at
    layer 0), on every backend."""
    from anee_fast.ops.backends import ops_for
    N, L, skip_cost = 37, 9, 0.1351
    g = torch.Generator().manual_seed(min_layers)
    budget = torch.rand(N, generator=g)
    depth = DepthAccounting(L, skip_cost, min_layers, always_last)
    recorder = _BudgetLeftRecorder()
    policy = DepthPolicy(N, depth, "cpu", ops_for(backend), budget_terms=depth.budget_terms(budget),
                         controller=recorder)
    h = torch.randn(N, 8, generator=g)
    expected = []
    for layer in range(L):
        if layer in depth.decidable_layers:
            expected.append(policy.budget if layer == 0 else (policy.limit - policy.spent) / L)
        policy.decide(layer, h, h)
    assert len(recorder.seen) == len(depth.decidable_layers)
    for seen, expect in zip(recorder.seen, expected):
        assert torch.equal(seen, expect)
    assert (policy.actions == SKIP).any() and (policy.actions == PROCESS).any()
