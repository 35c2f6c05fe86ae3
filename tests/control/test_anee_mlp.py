"""An ANEE 0.4 controller file drives the engine: its MLP's argmax over the documented six-feature
state is the action the engine takes.

The file is made here exactly as ANEE 0.4 saves it: `torch.save(module.state_dict())` of a module
whose attribute `net` is Linear(6, 32) -> ReLU -> Linear(32, 3), so the keys are net.0.*, net.2.*.
The state and the MLP are recomputed next to the test (float64) from the documented formula:
[log1p(|h|), log1p(|h - h_prev|), log1p(var h), budget_left - layers_left / L, budget_left, l / L],
h = residual entering layer l, h_prev = residual entering layer l - 1 (h itself at layer 0),
budget_left = compute the token may still spend, as a fraction of a full forward.
"""
import pathlib

import pytest
import torch
from torch import nn

from anee_fast import EXIT, LLM, PROCESS, SKIP, SamplingParams
from conftest import build_model, random_ids

L = 4
MIN_LAYERS = 1
MARGIN = 1e-4     # decisions closer than this to a tie are not compared (float noise)


class ANEEController(nn.Module):
    def __init__(self, state_dim=6, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, 3))


# ---- the reference --------------------------------------------------------------------------------

def anee_features(h, h_prev, budget_left, layer, num_layers):
    """[N, 6] float64, written out from the documented formula."""
    h, h_prev = h.double(), h_prev.double()
    n = h.shape[-1]
    norm = h.pow(2).sum(-1).sqrt()
    delta = (h - h_prev).pow(2).sum(-1).sqrt()
    mean = h.sum(-1, keepdim=True) / n
    var = (h - mean).pow(2).sum(-1) / (n - 1)
    budget_left = budget_left.double()
    layers_left = (num_layers - layer) / num_layers
    return torch.stack([norm.log1p(), delta.log1p(), var.log1p(), budget_left - layers_left,
                        budget_left, torch.full_like(budget_left, layer / num_layers)], dim=-1)


def mlp_scores(state_dict, x):
    """[N, 3] float64 scores of (PROCESS, SKIP, EXIT)."""
    w0, b0 = state_dict["net.0.weight"].double(), state_dict["net.0.bias"].double()
    w2, b2 = state_dict["net.2.weight"].double(), state_dict["net.2.bias"].double()
    return torch.clamp(x @ w0.T + b0, min=0) @ w2.T + b2


def residuals(llm, ids, actions):
    """Residual entering each layer when `actions` are executed (engine pieces, one prefill)."""
    engine = llm.engine
    seq = engine.new_sequence(ids, SamplingParams(max_tokens=0), 1.0, "budget")
    engine.block_manager.allocate(seq.seq_id, len(seq))
    hidden = []
    try:
        engine.runner.run([(seq, len(seq))], [0], fixed_actions=actions, hidden_states=hidden)
    finally:
        engine.block_manager.free(seq.seq_id)
    return hidden


def controller_state_dict(llm, ids, seed):
    """Weights that make the MLP's choice depend on each token's features: tokens whose residual
    norm is well above the layer's typical norm EXIT, well below SKIP, near it PROCESS; random
    extra units feed every feature (budget and layer ones included) into the decision."""
    hidden = residuals(llm, ids, torch.zeros(len(ids), L, dtype=torch.int8))
    layers = torch.arange(1, L, dtype=torch.float64) / L
    medians = torch.stack([anee_features(hidden[l], hidden[l - 1], torch.ones(len(ids)), l, L)[:, 0]
                           .median() for l in range(1, L)])
    slope, offset = torch.linalg.lstsq(torch.stack([layers, torch.ones_like(layers)], 1),
                                       medians[:, None]).solution[:, 0].tolist()
    g = torch.Generator().manual_seed(seed)
    module = ANEEController()
    k = 12.0
    with torch.no_grad():
        w0 = 1.5 * torch.randn(32, 6, generator=g)
        b0 = 0.5 * torch.randn(32, generator=g)
        w2 = 0.5 * torch.randn(3, 32, generator=g)
        # unit 0: norm above typical; unit 1: norm below typical.
        w0[0] = torch.tensor([k, 0, 0, 0, 0, -k * slope])
        b0[0] = -k * (offset + 0.03)
        w0[1] = torch.tensor([-k, 0, 0, 0, 0, k * slope])
        b0[1] = k * (offset - 0.03)
        w2[:, :2] = torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        module.net[0].weight.copy_(w0)
        module.net[0].bias.copy_(b0)
        module.net[2].weight.copy_(w2)
        module.net[2].bias.zero_()
        # Centre the random units' contribution over the calibration states, then favour PROCESS
        # by a margin the two norm units overcome for clearly atypical tokens.
        states = torch.cat([anee_features(hidden[l], hidden[l - 1], torch.full((len(ids),), 1 - l / L),
                                          l, L) for l in range(1, L)])
        centre = mlp_scores(module.state_dict(), states).mean(0).float()
        module.net[2].bias.copy_(torch.tensor([0.5, 0.0, 0.0]) - centre)
    return module.state_dict()


def check_decisions(llm, state_dict, ids, actions, budget, hidden):
    """The recorded actions are the MLP's argmax at every layer >= MIN_LAYERS up to the token's
    EXIT; enforcement may only turn a PROCESS that would overspend into an EXIT.
    Returns (decisions compared, decisions the controller was asked for)."""
    s = llm.weights.skip_cost()
    floor = (MIN_LAYERS + (L - MIN_LAYERS) * s) / L
    limit = max(budget, floor) * L
    T = len(ids)
    cost = torch.where(actions == PROCESS, 1.0, s).double()
    spent_before = torch.cat([torch.zeros(T, 1, dtype=torch.float64), cost.cumsum(1)[:, :-1]], 1)
    compared = asked = 0
    assert (actions[:, :MIN_LAYERS] == PROCESS).all()
    for l in range(MIN_LAYERS, L):
        budget_left = (limit - spent_before[:, l]) / L
        x = anee_features(hidden[l], hidden[l - 1] if l else hidden[0], budget_left, l, L)
        scores = mlp_scores(state_dict, x)
        top2 = scores.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > MARGIN
        proposal = scores.argmax(-1)
        for t in range(T):
            if l > MIN_LAYERS and actions[t, l - 1] == EXIT:
                assert actions[t, l] == EXIT          # sticky: the controller is not asked
                continue
            asked += 1
            if not clear[t]:
                continue
            compared += 1
            got, want = int(actions[t, l]), int(proposal[t])
            if got != want:
                # Only the budget may overrule the controller: a PROCESS that would leave too
                # little for the remaining layers' SKIPs becomes an EXIT.
                assert (want, got) == (PROCESS, EXIT), (t, l, want, got)
                after = spent_before[t, l] + 1 + (L - l - 1) * s
                assert after > limit + 1e-9, (t, l, float(after), limit)
    return compared, asked


@pytest.fixture(params=["gpt2", "llama_gqa", "qwen2"])
def setup(request, tmp_path):
    model = build_model(request.param, num_layers=L)
    llm = LLM(model, min_layers=MIN_LAYERS)
    ids = random_ids(model, 37, seed=50)
    state = controller_state_dict(llm, ids, seed=55)
    path = tmp_path / "controller.pt"
    torch.save(state, path)
    return llm, model, ids, state, path


@pytest.mark.parametrize("hidden_size", [48, 83])
def test_library_state_is_the_documented_formula(hidden_size):
    from anee_fast.control.features import anee_state
    g = torch.Generator().manual_seed(hidden_size)
    h = 3 * torch.randn(7, hidden_size, generator=g)
    h_prev = h + torch.randn(7, hidden_size, generator=g)
    budget_left = torch.rand(7, generator=g)
    for layer, num_layers in ((0, 4), (3, 4), (5, 30)):
        ours = anee_features(h, h_prev, budget_left, layer, num_layers)
        torch.testing.assert_close(anee_state(h, h_prev, budget_left, layer, num_layers).double(), ours,
                                   rtol=1e-5, atol=1e-5)


def test_file_has_anee_layout(setup):
    _, _, _, _, path = setup
    state = torch.load(path, weights_only=True)
    assert sorted(state) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert state["net.0.weight"].shape == (32, 6) and state["net.2.weight"].shape == (3, 32)


@pytest.mark.parametrize("budget", [1.0, 0.6, 0.3])
def test_score_actions_are_the_mlp_argmax(setup, budget):
    llm, model, ids, state, path = setup
    logits, trace = llm.score(ids, energy_budget=budget, controller=str(path), return_trace=True)
    decided = trace.actions[:, MIN_LAYERS:]
    if budget == 1.0:
        # The weights make the controller use all three actions (else the test proves little).
        for code in (PROCESS, SKIP, EXIT):
            assert (decided == code).sum() >= 5, (code, decided)
    hidden = residuals(llm, ids, trace.actions)
    compared, asked = check_decisions(llm, state, ids, trace.actions, budget, hidden)
    assert asked >= len(ids) and compared >= 0.9 * asked
    # A pathlib.Path works the same, and token-by-token decisions agree.
    _, trace_path = llm.score(ids, energy_budget=budget, controller=pathlib.Path(path),
                              return_trace=True, chunk_size=1)
    assert torch.equal(trace_path.actions, trace.actions)


def test_budget_one_never_overrules(setup):
    """At budget 1.0 enforcement never bites: recorded == argmax up to and including the EXIT."""
    llm, model, ids, state, path = setup
    _, trace = llm.score(ids, energy_budget=1.0, controller=str(path), return_trace=True)
    hidden = residuals(llm, ids, trace.actions)
    s = llm.weights.skip_cost()
    cost = torch.where(trace.actions == PROCESS, 1.0, s).double()
    spent_before = torch.cat([torch.zeros(len(ids), 1, dtype=torch.float64), cost.cumsum(1)[:, :-1]], 1)
    mismatches = 0
    for l in range(MIN_LAYERS, L):
        x = anee_features(hidden[l], hidden[l - 1], (L - spent_before[:, l]) / L, l, L)
        proposal = mlp_scores(state, x).argmax(-1)
        live = (trace.actions[:, :l] != EXIT).all(1)
        mismatches += int((proposal[live] != trace.actions[live, l].long()).sum())
    assert mismatches == 0


def test_generate_decode_decisions_are_the_mlp_argmax(setup):
    """Generated tokens go through the decode path one at a time; their decisions follow the MLP
    too (the residuals are recomputed by one prefill replay of the trace)."""
    llm, model, ids, state, path = setup
    prompt = ids[:9].tolist()
    out = llm.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True), energy_budget=1.0,
                       controller=str(path))[0]
    processed = prompt + out.token_ids[:-1]
    actions = out.trace.actions
    assert actions.shape == (len(processed), L)
    hidden = residuals(llm, processed, actions)
    compared, asked = check_decisions(llm, state, processed, actions, 1.0, hidden)
    assert asked >= len(processed) and compared >= 0.9 * asked


def test_a_bad_controller_changes_decisions(setup, tmp_path):
    """Sanity of the check itself: a controller with other weights records other actions, and
    check_decisions rejects them for the original weights."""
    llm, model, ids, state, path = setup
    other = {k: v.clone() for k, v in state.items()}
    other["net.2.bias"] = other["net.2.bias"] + torch.tensor([0.0, 0.0, 100.0])   # EXIT everywhere
    other_path = tmp_path / "other.pt"
    torch.save(other, other_path)
    _, trace = llm.score(ids, energy_budget=1.0, controller=str(other_path), return_trace=True)
    assert (trace.actions[:, MIN_LAYERS:] == EXIT).all()
    hidden = residuals(llm, ids, trace.actions)
    with pytest.raises(AssertionError):
        check_decisions(llm, state, ids, trace.actions, 1.0, hidden)
