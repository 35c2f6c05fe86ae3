"""budget_controller: the trained controller's proposals for every token, one launch.

In PyTorch the controller (ops/reference.py:budget_controller) is about 110 tiny tensor ops per
layer, each a kernel launch on a GPU. One program per row, in float32: a walk over h and h_prev in
BLOCK_H chunks for the sums of the scalar features, a second one for the centred variance and the
projection of the RMS-normalised row, then the small MLP as [width, inputs] tiles and the rule.
log1p is log(1 + x) (libdevice has no interpreter version): the features feed the net, whose
decisions differ from the reference only within rounding of its logit's zero or margin. The rule's
numbers are the reference's: float32 constants from the host's doubles, one rounding per step
(no FMA: the launch turns fusion off), divisions rounded as IEEE does.
"""
import torch
import triton
import triton.language as tl

from anee_fast.ops.reference import CONTROLLER_FEATURES, check_budget_controller_args

PROCESS = tl.constexpr(0)    # anee_fast/actions.py (a jitted kernel reads constexprs)
SKIP = tl.constexpr(1)
EXIT = tl.constexpr(2)
FEATURES = tl.constexpr(len(CONTROLLER_FEATURES))
FREE = tl.constexpr(1.0 - 1e-6)    # an affordable fraction at least this pays for every layer


@triton.jit
def _budget_controller_kernel(h_ptr, prev_ptr, budget_ptr, left_ptr, mean_ptr, std_ptr, proj_ptr,
                              inp_w_ptr, inp_b_ptr, layer_w_ptr, hid_w_ptr, hid_b_ptr, out_w_ptr,
                              out_b_ptr, codes_ptr, H, P, W, stride_h, stride_p, layer,
                              num_layers_f, remaining_cost, remaining_share, layers_left,
                              fixed_layers, order_cost, process_share, order_position,
                              order_length, margin, net_min_budget, net_max_budget,
                              exit_threshold, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    h_row = h_ptr + row * stride_h
    p_row = prev_ptr + row * stride_p
    s = tl.zeros([BLOCK_H], dtype=tl.float32)
    hh = tl.zeros([BLOCK_H], dtype=tl.float32)
    pp = tl.zeros([BLOCK_H], dtype=tl.float32)
    hp = tl.zeros([BLOCK_H], dtype=tl.float32)
    dd = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        m = start + cols < H
        a = tl.load(h_row + start + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(p_row + start + cols, mask=m, other=0.0).to(tl.float32)
        s += a
        hh += a * a
        pp += b * b
        hp += a * b
        dd += (a - b) * (a - b)
    hh_sum = tl.sum(hh, axis=0)
    mean = tl.sum(s, axis=0) / H
    rstd = 1.0 / tl.sqrt_rn(hh_sum / H + 1e-6)
    ps = tl.arange(0, BLOCK_P)
    pm = ps < P
    centred = tl.zeros([BLOCK_H], dtype=tl.float32)
    proj = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        m = start + cols < H
        a = tl.load(h_row + start + cols, mask=m, other=0.0).to(tl.float32)
        c = tl.where(m, a - mean, 0.0)
        centred += c * c
        w = tl.load(proj_ptr + ps[:, None] * H + (start + cols)[None, :],
                    mask=pm[:, None] & m[None, :], other=0.0)
        proj += w * (a * rstd)[None, :]
    projected = tl.sum(proj, axis=1)                               # [BLOCK_P]

    n1 = tl.sqrt_rn(hh_sum)
    n2 = tl.sqrt_rn(tl.sum(pp, axis=0))
    budget = tl.load(budget_ptr + row)
    left = tl.load(left_ptr + row)
    affordable = tl.math.div_rn(left * num_layers_f - remaining_cost, remaining_share)
    affordable = tl.minimum(tl.maximum(affordable, -1.0), 2.0)
    k = tl.arange(0, FEATURES)
    f = tl.where(k == 0, tl.log(1.0 + n1),
        tl.where(k == 1, tl.log(1.0 + tl.sqrt_rn(tl.sum(dd, axis=0))),
        tl.where(k == 2, tl.log(1.0 + tl.sum(centred, axis=0) / (H - 1)),
        tl.where(k == 3, tl.sum(hp, axis=0) / (tl.maximum(n1, 1e-8) * tl.maximum(n2, 1e-8)),
        tl.where(k == 4, budget,
        tl.where(k == 5, left,
        tl.where(k == 6, affordable, layers_left)))))))
    x = (f - tl.load(mean_ptr + k)) / tl.load(std_ptr + k)

    js = tl.arange(0, BLOCK_W)
    jm = js < W
    inputs = FEATURES + P                                          # inp_weight's row length
    w_x = tl.load(inp_w_ptr + js[:, None] * inputs + k[None, :], mask=jm[:, None], other=0.0)
    w_p = tl.load(inp_w_ptr + js[:, None] * inputs + FEATURES + ps[None, :],
                  mask=jm[:, None] & pm[None, :], other=0.0)
    z = tl.sum(w_x * x[None, :], axis=1) + tl.sum(w_p * projected[None, :], axis=1)
    z += tl.load(inp_b_ptr + js, mask=jm, other=0.0) + tl.load(layer_w_ptr + layer * W + js,
                                                               mask=jm, other=0.0)
    z = tl.maximum(z, 0.0)                                         # 0 past W
    w_h = tl.load(hid_w_ptr + js[:, None] * W + js[None, :], mask=jm[:, None] & jm[None, :],
                  other=0.0)
    hid = tl.maximum(tl.sum(w_h * z[None, :], axis=1) + tl.load(hid_b_ptr + js, mask=jm, other=0.0),
                     0.0)
    logit = tl.sum(tl.load(out_w_ptr + js, mask=jm, other=0.0) * hid, axis=0) + tl.load(out_b_ptr)

    process = logit > 0
    limit = budget * num_layers_f - fixed_layers - order_cost
    processable = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(limit, process_share) + 1e-6), 0.0),
                             order_length)
    static = (order_position < 0) | (order_position >= order_length - processable)
    fallback = ~(tl.abs(logit) > margin) | (budget < net_min_budget) | (budget > net_max_budget)
    process = tl.where((margin >= 0) & fallback, static, process)
    process = process | (affordable >= FREE)
    code = tl.where(left < exit_threshold, EXIT, tl.where(process, PROCESS, SKIP))
    tl.store(codes_ptr + row, code.to(tl.int8))


def budget_controller(h, h_prev, budget, budget_left, scalar_mean, scalar_std, proj_weight,
                      inp_weight, inp_bias, layer_weight, hidden_weight, hidden_bias, out_weight,
                      out_bias, layer: int, num_layers: int, skip_cost: float,
                      order_position: int, order_length: int, margin: float,
                      net_min_budget: float, net_max_budget: float, exit_threshold: float):
    """See ops/reference.py:budget_controller: int8 codes [N] for h, h_prev [N, hidden]."""
    check_budget_controller_args(h, h_prev, budget, budget_left, scalar_mean, scalar_std,
                                 proj_weight, inp_weight, inp_bias, layer_weight, hidden_weight,
                                 hidden_bias, out_weight, out_bias, layer, num_layers, skip_cost,
                                 order_position, order_length)
    N, H = h.shape
    P, W = proj_weight.shape[0], inp_weight.shape[0]
    codes = torch.empty(N, dtype=torch.int8, device=h.device)
    if N:
        h = h if h.stride(-1) == 1 else h.contiguous()
        h_prev = h_prev if h_prev.stride(-1) == 1 else h_prev.contiguous()
        block_p = triton.next_power_of_2(max(P, 1))
        block_h = min(triton.next_power_of_2(max(H, 1)), max(32, 4096 // block_p))
        L, D, remaining = float(num_layers), float(order_length), float(num_layers - layer)
        _budget_controller_kernel[(N,)](
            h, h_prev, budget.contiguous(), budget_left.contiguous(), scalar_mean.contiguous(),
            scalar_std.contiguous(), proj_weight.contiguous(), inp_weight.contiguous(),
            inp_bias.contiguous(), layer_weight.contiguous(), hidden_weight.contiguous(),
            hidden_bias.contiguous(), out_weight.contiguous(), out_bias.contiguous(), codes,
            H, P, W, h.stride(0), h_prev.stride(0), int(layer),
            L, remaining * skip_cost, remaining * (1.0 - skip_cost), remaining / L, L - D,
            D * skip_cost, 1.0 - skip_cost, float(order_position), D, float(margin),
            float(net_min_budget), float(net_max_budget), float(exit_threshold),
            BLOCK_H=block_h, BLOCK_P=block_p, BLOCK_W=triton.next_power_of_2(max(W, 1)),
            num_warps=4, enable_fp_fusion=False)
    return codes
