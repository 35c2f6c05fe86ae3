"""budget_controller of every compiled backend against the reference (see op_cases): the trained
controller's features, net and rule as one op."""
import pytest
import torch

from anee_fast.ops import reference as ref
from anee_fast.ops.backends import ops_for
from op_cases import TARGETS, Target, target, target_id  # noqa: F401

LAYER, NUM_LAYERS, SKIP_COST = 3, 9, 0.2
# (rows, hidden, proj_dim, width)
SIZES = [(1, 576, 8, 32), (3, 33, 5, 7), (17, 8, 3, 13), (17, 576, 5, 7)]
# The rule's numbers past the net: order_position, order_length, margin (< 0: no static
# fallback), net_min_budget, net_max_budget (budgets here are drawn in [0.3, 1]),
# exit_threshold.
RULES = {"net": (-1, 0, -1.0, 0.0, 1.0, 0.0), "fallback": (2, 6, 0.7, 0.0, 1.0, 0.0),
         "fallback-not-in-order": (-1, 6, 0.7, 0.0, 1.0, 0.0),
         "fallback-outside-the-trusted-band": (2, 6, 0.7, 0.45, 0.8, 0.0),
         "exit": (4, 6, 0.7, 0.6, 1.0, 0.15)}
# Other dtypes of h: native's CPU kernel and the Triton interpreter read bfloat16 and float16.
HALF_TARGETS = [(backend, "cpu", dtype) for backend in ("native", "triton")
                for dtype in (torch.bfloat16, torch.float16)] + [
    pytest.param((backend, "cuda", torch.float16), marks=pytest.mark.cuda,
                 id=f"{backend}-cuda-float16") for backend in ("triton", "native")]
NEAR = 1e-3       # rows whose reference logit is this close to 0 or to +-margin are not compared


def net_tensors(hidden, proj_dim, width, gen):
    """Random float32 net tensors in the op's order, at ControllerNet's scales."""
    features = len(ref.CONTROLLER_FEATURES)
    r = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen)
    return [r(features, scale=0.3), 0.5 + torch.rand(features, generator=gen),
            r(proj_dim, hidden, scale=hidden ** -0.5), r(width, features + proj_dim, scale=0.5),
            r(width, scale=0.3), r(NUM_LAYERS, width, scale=0.3), r(width, width, scale=width ** -0.5),
            r(width, scale=0.3), r(1, width, scale=width ** -0.5), r(1, scale=0.3)]


def reference_logit(h, h_prev, budget, budget_left, net):
    """[N] float32: the net's logit as the reference computes it."""
    scalars, normed = ref.controller_features(h, h_prev, budget, budget_left, LAYER, NUM_LAYERS,
                                              SKIP_COST)
    mean, std, proj, inp_w, inp_b, layer_w, hid_w, hid_b, out_w, out_b = net
    return ref.controller_logit(scalars, normed, mean, std, proj, inp_w, inp_b, layer_w[LAYER],
                                hid_w, hid_b, out_w, out_b)


def controller_inputs(rows, hidden, proj_dim, width, gen):
    """h, h_prev, budget, budget_left and a net whose logits spread around 0 (out_weight and
    out_bias rescaled to a spread of about 3), so that every branch of the rule is taken."""
    h = 2 * torch.randn(rows, hidden, generator=gen)
    h_prev = h + 0.7 * torch.randn(rows, hidden, generator=gen)
    budget = 0.3 + 0.7 * torch.rand(rows, generator=gen)
    budget_left = torch.rand(rows, generator=gen)       # from 2/3 on a token can pay every layer
    net = net_tensors(hidden, proj_dim, width, gen)
    logit = reference_logit(h, h_prev, budget, budget_left, net)
    scale = 3 / max(float(logit.std()) if rows > 1 else float(logit.abs()), 1e-3)
    net[8] = net[8] * scale
    net[9] = (net[9] - (logit.mean() if rows > 1 else 0.0)) * scale
    return h, h_prev, budget, budget_left, net


def check_against_reference(target, rows, hidden, proj_dim, width, rule, seed):
    g = torch.Generator().manual_seed(seed)
    h, h_prev, budget, budget_left, net = controller_inputs(rows, hidden, proj_dim, width, g)
    h_t, prev_t = target.to(h), target.to(h_prev)
    on_device = [t.to(target.device) for t in (budget, budget_left, *net)]
    args = (LAYER, NUM_LAYERS, SKIP_COST, *RULES[rule])
    got = target.ops.budget_controller(h_t, prev_t, *on_device, *args)
    expect = ref.budget_controller(target.exact(h), target.exact(h_prev), budget, budget_left, *net,
                                   *args)
    assert got.dtype == torch.int8 and got.shape == (rows,) and got.device.type == target.device.type
    logit = reference_logit(target.exact(h).cpu(), target.exact(h_prev).cpu(), budget, budget_left,
                            net)
    margin = RULES[rule][2]
    near = (logit.abs() < NEAR) | ((logit.abs() - margin).abs() < NEAR)
    assert int(near.sum()) <= max(1, rows // 8), "too many rows at a decision boundary to compare"
    assert torch.equal(got.cpu()[~near], expect[~near])
    return expect


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("rows,hidden,proj_dim,width", SIZES)
def test_budget_controller(target, rows, hidden, proj_dim, width, rule):
    """Every row's code equals the reference's (but where the logit is within rounding of 0 or
    of the margin): the net's PROCESS/SKIP, the static fallback, PROCESS for a token that can pay
    for every remaining layer, EXIT under the threshold."""
    expect = check_against_reference(target, rows, hidden, proj_dim, width, rule, seed=rows * hidden)
    if rows == 17:
        codes = {0, 1, 2} if rule == "exit" else {0, 1}
        assert set(expect.tolist()) == codes


@pytest.mark.parametrize("target", HALF_TARGETS, ids=target_id, indirect=True)
@pytest.mark.parametrize("rule", ["net", "exit"])
def test_budget_controller_half_precision_h(target, rule):
    """h and h_prev in bfloat16 / float16, computed in float32: the reference's codes on the same
    (rounded) values."""
    check_against_reference(target, 17, 576, 5, 7, rule, seed=11)


def test_the_rule_past_the_net(target):
    """Hand-made rows through each branch of the rule (out_weight 0: the logit is out_bias): a
    sure net keeps its decision, an unsure one follows the static set of its budget, a token
    that can pay for every remaining layer PROCESSes (budget_left >= 2/3 here), one under the
    threshold EXITs."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(5, 16, generator=g)
    net = net_tensors(16, 3, 5, g)
    net[8] = torch.zeros(1, 5)
    budget = torch.tensor([0.3, 0.9, 1.0, 1.0, 0.3])
    budget_left = torch.tensor([0.2, 0.2, 0.2, 0.9, 0.01])
    # Layer 3 is 3rd of an order of 6 (3 layers always run): budget 0.3 pays for none of the 6,
    # 0.9 for 4 (SKIPs 2: runs layer 3), 1.0 for all.
    # Trusted in [0.95, 1] a sure SKIP holds only at budget 1.0: at 0.9 the static set runs the
    # layer. Trusted in [0.3, 0.9] it holds at 0.3 and 0.9 but not at 1.0.
    for logit, band, want in ((-5.0, (0.0, 1.0), [1, 1, 1, 0, 2]),
                              (5.0, (0.0, 1.0), [0, 0, 0, 0, 2]),
                              (-0.5, (0.0, 1.0), [1, 0, 0, 0, 2]),
                              (-5.0, (0.95, 1.0), [1, 0, 1, 0, 2]),
                              (-5.0, (0.3, 0.9), [1, 1, 0, 0, 2])):
        net[9] = torch.tensor([logit])
        on_device = [t.to(target.device) for t in (budget, budget_left, *net)]
        rule = (LAYER, NUM_LAYERS, SKIP_COST, 2, 6, 1.0, *band, 0.05)
        got = target.ops.budget_controller(target.to(h), target.to(h + 0.1), *on_device, *rule)
        assert got.tolist() == want, (logit, band)
        assert torch.equal(ref.budget_controller(h, h + 0.1, budget, budget_left, *net,
                                                 *rule).cpu(),
                           got.cpu())


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_bad_inputs_fail_clearly(backend):
    ops = ops_for(backend)
    g = torch.Generator().manual_seed(0)
    h, h_prev, budget, budget_left, net = controller_inputs(3, 16, 3, 5, g)
    args = (LAYER, NUM_LAYERS, SKIP_COST, -1, 0, -1.0, 0.0, 1.0, 0.0)

    def call(h=h, h_prev=h_prev, budget=budget, budget_left=budget_left, net=net, args=args):
        return ops.budget_controller(h, h_prev, budget, budget_left, *net, *args)

    def with_net(i, t):
        return [t if j == i else x for j, x in enumerate(net)]

    errors = (ValueError, RuntimeError)
    with pytest.raises(errors, match="h and h_prev must be floating"):
        call(h_prev=h_prev[:, :-1])
    with pytest.raises(errors, match="h and h_prev must be floating"):
        call(h_prev=h_prev.half())
    with pytest.raises(errors, match="h and h_prev must be floating"):
        call(h=h[0])
    with pytest.raises(errors, match="budget_left must be float32"):
        call(budget_left=budget_left.double())
    with pytest.raises(errors, match="budget must be float32"):
        call(budget=budget[:2])
    with pytest.raises(errors, match="proj_weight must be float32"):
        call(net=with_net(2, net[2][:, :-1]))
    with pytest.raises(errors, match="inp_weight must be float32"):
        call(net=with_net(3, net[3][:, :-1]))
    with pytest.raises(errors, match="layer_weight must be float32"):
        call(net=with_net(5, net[5][:-1]))
    with pytest.raises(errors, match="hidden_bias must be float32"):
        call(net=with_net(7, net[7].half()))
    with pytest.raises(errors, match="out_bias must be float32"):
        call(net=with_net(9, torch.zeros(())))
    with pytest.raises(errors, match="layer 9 is out of range"):
        call(args=(9, NUM_LAYERS, SKIP_COST, -1, 0, -1.0, 0.0, 1.0, 0.0))
    with pytest.raises(errors, match="skip_cost must be in"):
        call(args=(LAYER, NUM_LAYERS, 1.0, -1, 0, -1.0, 0.0, 1.0, 0.0))
    with pytest.raises(errors, match="order_position must be"):
        call(args=(LAYER, NUM_LAYERS, SKIP_COST, 6, 6, 0.5, 0.0, 1.0, 0.0))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_a_tensor_on_another_device_fails_clearly(backend):
    ops = ops_for(backend)
    g = torch.Generator().manual_seed(0)
    h, h_prev, budget, budget_left, net = controller_inputs(3, 16, 3, 5, g)
    with pytest.raises((ValueError, RuntimeError), match="budget_controller"):
        ops.budget_controller(h.cuda(), h_prev.cuda(), budget.cuda(), budget_left.cuda(), *net,
                              LAYER, NUM_LAYERS, SKIP_COST, -1, 0, -1.0, 0.0, 1.0, 0.0)
