"""Pure-PyTorch ops: the ground truth every Triton and C++/CUDA kernel is tested against.

The ops a backend provides (same names and signatures in `kernels/` and `csrc/`):

- `norm(x, weight, bias, eps, rms) -> out`
- `add_norm(x, residual, weight, bias, eps, rms) -> (sum, normed)`
- `linear(x, weight, bias, activation="none", residual=None, row_mask=None) -> out`
- `skip_kv(h, norm_weight, norm_bias, kv_weight, kv_bias, positions, inv_freq, rope_scale,
           k_cache, v_cache, slot_mapping, eps, rms, q_out=None) -> ()`

The weights of linear and skip_kv are float tensors or `QuantizedWeight`s (weight_formats.py);
the compiled backends take the latter as its uint8 rows plus a trailing `weight_format` name.
- `skip_adapter(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask, eps, rms)
   -> out`
- `paged_attention(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size, scale,
                   sliding_window) -> out`
- `policy_step(proposed, spent, stopped, allowed, actions, layer, commitment, skip_cost,
               stop_code, forced) -> process`
- `saturation_codes(h, h_prev, budget_left, skip_saturation, exit_saturation, exit_threshold)
   -> codes`
- `budget_controller(h, h_prev, budget, budget_left, scalar_mean, scalar_std, proj_weight,
                     inp_weight, inp_bias, layer_weight, hidden_weight, hidden_bias, out_weight,
                     out_bias, layer, num_layers, skip_cost, order_position, order_length, margin,
                     net_min_budget, net_max_budget, exit_threshold) -> codes`

Cache layout: per layer [num_slots + 1, kv_heads, head_dim], slot = block * block_size + offset;
the spare last slot belongs to no sequence and is never written. Slot -1 in a slot mapping
means "write nothing".
Everything a kernel needs is a device tensor or a plain number: no host-side ragged metadata.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..actions import EXIT, PROCESS, SKIP
from .weight_formats import dequantize, format_of


def norm(x, weight, bias, eps: float, rms: bool):
    """RMSNorm (rms=True; bias None) or LayerNorm over the last dim, computed in float32."""
    xf = x.float()
    if rms:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return F.layer_norm(xf, (x.shape[-1],), weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


def add_norm(x, residual, weight, bias, eps: float, rms: bool):
    """(s, norm(s)) with s = x + residual in x's dtype: a residual add and the norm that reads
    its result, as one op (the block's attention output joining the residual stream)."""
    s = x + residual
    return s, norm(s, weight, bias, eps, rms)


ACTIVATIONS = ("none", "gelu_tanh", "silu_gated")


def linear(x, weight, bias=None, activation: str = "none", residual=None, row_mask=None):
    """activation(x @ weight^T + bias) (+ residual): every projection of the block and the LM
    head, with the MLP's activation and its residual add as epilogues (one launch where a
    backend fuses them). activation: "none", "gelu_tanh" (GPT-2), or "silu_gated" (Llama: the
    weight's rows are gate | up, the result silu(gate) * up, half as wide). Each step rounds to
    x's dtype, as separate ops would.

    row_mask (bool, x's leading shape): a row where it is False contributes zero, whatever its
    x holds (NaN included), so it gets its residual back unchanged (or zeros). The masked layer
    loop uses it to keep a SKIP row's residual without a `where` launch of its own.

    weight: a float tensor [N, K] or a QuantizedWeight; one that is not x's dtype (quantized,
    or bfloat16 weights under float32 activations) is dequantized to float32 and the product
    computed in float32, then rounded to x's dtype."""
    check_row_mask(row_mask, x)
    y = _product(x, weight, bias)
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation == "silu_gated":
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    elif activation != "none":
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if row_mask is not None:
        y = torch.where(row_mask[..., None], y, 0)
    return y if residual is None else residual + y


def _product(x, weight, bias):
    """x @ weight^T + bias; in float32 from the dequantized weight unless it is a float tensor
    of x's dtype (weight_formats.py)."""
    if format_of(weight) == "dense" and weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight expects {weight.shape[-1]}")
    y = F.linear(x.float(), dequantize(weight), None if bias is None else bias.float())
    return y.to(x.dtype)


def check_row_mask(row_mask, x):
    """linear's row_mask is None or a bool tensor of x's leading shape on x's device."""
    if row_mask is not None and (row_mask.dtype != torch.bool or row_mask.shape != x.shape[:-1]
                                 or row_mask.device != x.device):
        raise ValueError(f"linear: row_mask must be bool {list(x.shape[:-1])} on {x.device}, got "
                         f"{row_mask.dtype} {list(row_mask.shape)} on {row_mask.device}")


def apply_rope(x, positions, inv_freq, scale: float = 1.0):
    """Rotary embedding in the rotate-half layout (Llama): x [N, heads, head_dim]."""
    return rotate(x, *rope_cos_sin(positions, inv_freq, scale))


def rope_cos_sin(positions, inv_freq, scale: float = 1.0):
    """(cos, sin), float32 [N, 1, head_dim], of the rows' positions: computed once per step
    and shared by every layer's queries."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale)[:, None, :], (emb.sin() * scale)[:, None, :]


def rotate(x, cos, sin):
    """x [N, heads, head_dim] rotated by rope_cos_sin's tables, in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def skip_kv(h, norm_weight, norm_bias, kv_weight, kv_bias, positions, inv_freq: Optional[torch.Tensor],
            rope_scale: float, k_cache, v_cache, slot_mapping, eps: float, rms: bool,
            q_out: Optional[torch.Tensor] = None):
    """One layer's SKIP path for the rows h [N, hidden], as one op: norm -> K|V projection ->
    RoPE on K (when inv_freq is given) -> write to the cache at slot_mapping (slot -1: nothing).

    norm_weight/norm_bias [hidden]; kv_weight [2*kv_size, hidden] (a float tensor or a
    QuantizedWeight, as linear's weight) with rows K | V; kv_bias
    [2*kv_size]; k_cache/v_cache [slots + 1, kv_heads, d], the layer's cache. One layer per
    call: the engine decides per token on the device, so it never knows on the host how many
    layers in a row a token skips.

    With q_out [N, heads, d], kv_weight/kv_bias hold the rows K | V | Q, and every row's query
    (RoPE'd like K) lands in q_out: a PROCESS row's whole QKV projection and cache write in one
    launch, sharing the norm.
    """
    check_skip_kv_args(h, norm_weight, norm_bias, kv_weight, kv_bias, k_cache, v_cache, q_out)
    kv_heads, d = k_cache.shape[1], k_cache.shape[2]
    kvq = _product(norm(h, norm_weight, norm_bias, eps, rms), kv_weight, kv_bias)
    k = kvq[:, :kv_heads * d].reshape(-1, kv_heads, d)
    v = kvq[:, kv_heads * d:2 * kv_heads * d].reshape(-1, kv_heads, d)
    if inv_freq is not None:
        k = apply_rope(k, positions, inv_freq, rope_scale)
    # Without host-side filtering: padding rows target the spare last slot and carry that slot's
    # own content, so it stays as it was.
    spare = k_cache.shape[0] - 1
    valid = (slot_mapping >= 0)[:, None, None]
    slots = torch.where(slot_mapping >= 0, slot_mapping, spare)
    k_cache.index_copy_(0, slots, torch.where(valid, k, k_cache[spare]))
    v_cache.index_copy_(0, slots, torch.where(valid, v, v_cache[spare]))
    if q_out is not None:
        q = kvq[:, 2 * kv_heads * d:].reshape(q_out.shape)
        q_out.copy_(q if inv_freq is None else apply_rope(q, positions, inv_freq, rope_scale))


def check_skip_kv_args(h, norm_weight, norm_bias, kv_weight, kv_bias, k_cache, v_cache, q_out):
    """skip_kv's shapes (csrc/op_checks.h checks the same for the native ops): a misshapen
    weight would otherwise broadcast or reshape into a wrong result instead of an error."""
    if h.dim() != 2 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(f"skip_kv: h must be [N, hidden] and k_cache, v_cache both [slots, "
                         f"kv_heads, head_dim], got h {list(h.shape)}, k_cache "
                         f"{list(k_cache.shape)}, v_cache {list(v_cache.shape)}")
    (n, hidden), (_, kv_heads, d) = h.shape, k_cache.shape
    if q_out is not None and (q_out.dim() != 3 or q_out.shape[0] != n or q_out.shape[2] != d):
        raise ValueError(f"skip_kv: q_out must be [N, heads, head_dim], got {list(q_out.shape)}")
    rows = (2 * kv_heads + (0 if q_out is None else q_out.shape[1])) * d
    layout = "K|V" if q_out is None else "K|V|Q"
    for name, t, shape in (("norm_weight", norm_weight, [hidden]), ("norm_bias", norm_bias, [hidden]),
                           (f"kv_weight ({layout} rows)", kv_weight, [rows, hidden]),
                           (f"kv_bias ({layout})", kv_bias, [rows])):
        if t is not None and list(t.shape) != shape:
            raise ValueError(f"skip_kv: {name} must be {shape}, got {list(t.shape)}")


def skip_adapter(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask,
                 eps: float, rms: bool):
    """The SKIP path's learned correction for the rows h [N, hidden], as one op:
    out = h + up_weight @ (down_weight @ norm(h)) + up_bias on the rows where row_mask holds,
    h itself (bit for bit, whatever the adapter would give) on the others.

    norm_weight/norm_bias: the layer's input norm (skip_kv's); down_weight [rank, hidden],
    up_weight [hidden, rank] (float tensors of h's dtype, or QuantizedWeights of one format:
    see linear), up_bias [hidden] or None; row_mask bool [N] (the rows that do not
    PROCESS the layer). Each step rounds to h's dtype, as separate ops would. A layer that
    PROCESSes a row replaces its residual; one that skips it adds this low-rank estimate of the
    block's contribution instead of nothing, so fewer layers cost less quality.
    """
    check_skip_adapter_args(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask)
    z = _product(norm(h, norm_weight, norm_bias, eps, rms), down_weight, None)
    return torch.where(row_mask[:, None], h + _product(z, up_weight, up_bias), h)


def check_skip_adapter_args(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask):
    """skip_adapter's shapes and formats (csrc/op_checks.h checks the same for the native ops)."""
    if format_of(down_weight) != format_of(up_weight):
        raise ValueError(f"skip_adapter: down_weight and up_weight must have one format, got "
                         f"{format_of(down_weight)} and {format_of(up_weight)}")
    if format_of(down_weight) == "dense" and not down_weight.dtype == up_weight.dtype == h.dtype:
        raise ValueError(f"skip_adapter: dense down_weight and up_weight must have h's dtype "
                         f"{h.dtype}, got {down_weight.dtype} and {up_weight.dtype}")
    if h.dim() != 2 or len(down_weight.shape) != 2:
        raise ValueError(f"skip_adapter: h must be [N, hidden] and down_weight [rank, hidden], got "
                         f"h {list(h.shape)}, down_weight {list(down_weight.shape)}")
    (n, hidden), rank = h.shape, down_weight.shape[0]
    for name, t, shape in (("norm_weight", norm_weight, [hidden]), ("norm_bias", norm_bias, [hidden]),
                           ("down_weight", down_weight, [rank, hidden]),
                           ("up_weight", up_weight, [hidden, rank]), ("up_bias", up_bias, [hidden])):
        if t is not None and list(t.shape) != shape:
            raise ValueError(f"skip_adapter: {name} must be {shape}, got {list(t.shape)}")
    if row_mask.dtype != torch.bool or list(row_mask.shape) != [n] or row_mask.device != h.device:
        raise ValueError(f"skip_adapter: row_mask must be bool [{n}] on {h.device}, got "
                         f"{row_mask.dtype} {list(row_mask.shape)} on {row_mask.device}")


def paged_attention(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size: int,
                    scale: float, sliding_window: int = 0):
    """Causal attention of each query row over its own sequence's cached K/V.

    q [N, heads, d]; k_cache/v_cache [slots + 1, kv_heads, d]; block_tables [S, max_blocks];
    row n belongs to sequence seq_idx[n] and sees its positions 0..positions[n] (only the last
    `sliding_window` of them when > 0); a row with a negative position sees no key and gets
    zeros. GQA: heads is a multiple of kv_heads.
    """
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    key_pos = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    out = torch.empty_like(q)
    for start in range(0, q.shape[0], _ROWS_PER_CHUNK):    # bounds the gathered K/V's memory
        rows = slice(start, start + _ROWS_PER_CHUNK)
        tables = block_tables[seq_idx[rows]]                                      # [n, max_blocks]
        slots = tables[:, key_pos // block_size] * block_size + key_pos % block_size  # [n, ctx]
        k = k_cache[slots].repeat_interleave(heads // kv_heads, dim=2)           # [n, ctx, heads, d]
        v = v_cache[slots].repeat_interleave(heads // kv_heads, dim=2)
        q_pos = positions[rows, None]
        mask = key_pos[None, :] <= q_pos
        if sliding_window > 0:
            mask &= key_pos[None, :] > q_pos - sliding_window
        o = F.scaled_dot_product_attention(q[rows, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask[:, None, None, :], scale=scale)
        sees_a_key = q_pos[:, :, None] >= 0     # its own key at least; explicit: not every SDPA kernel zeros
        out[rows] = torch.where(sees_a_key, o[:, :, 0, :], 0)
    return out


_ROWS_PER_CHUNK = 64


def policy_step(proposed, spent, stopped, allowed, limit, budget_left, actions, layer: int,
                commitment: float, skip_cost: float, stop_code: int, forced: bool):
    """One layer of the depth policy's budget rule (depth_policy.py) for every token, as one op:
    a dozen tiny tensor ops per layer otherwise, each a kernel launch on a GPU.

    proposed [N] int8: the controller's codes (ignored when `forced`: every token PROCESSes).
    A PROCESS that would leave spent + commitment > allowed breaks the budget; a token that
    proposes EXIT or breaks it is stopped for good and takes `stop_code`. Writes the action to
    actions[:, layer] (int8 [N, L]), adds its cost (1 or skip_cost) to spent (float32 [N]),
    updates stopped (bool [N]) in place; returns the PROCESS mask [N] bool. Layer 0 starts a
    step: spent and stopped are written, not read (as if zero and False), so a step's state
    needs no zeroing launch of its own.

    Then writes budget_left = (limit - spent) / L (float32 [N]; limit float32 [N]: the token's
    budget in layers; L = actions.shape[1]): what the next layer's controller reads, so that it
    costs no ops of its own.
    """
    if layer == 0:
        spent.zero_()
        stopped.zero_()
    if forced:
        action = torch.full_like(proposed, PROCESS)
    else:
        broke = (proposed == PROCESS) & (spent + commitment > allowed)
        stopped |= (proposed == EXIT) | broke
        action = torch.where(stopped, stop_code, proposed).to(torch.int8)
    actions[:, layer] = action
    process = action == PROCESS
    spent += torch.where(process, 1.0, skip_cost)
    budget_left.copy_((limit - spent) / actions.shape[1])
    return process


def saturation_codes(h, h_prev, budget_left, skip_saturation: float, exit_saturation: float,
                     exit_threshold: float):
    """The saturation heuristic's proposals (controllers.HeuristicController) for every token,
    as one op: about twenty tiny tensor ops per layer otherwise, each a kernel launch on a GPU.

    h, h_prev [N, hidden]: the residual entering this layer and the previous one; budget_left
    [N] float32. A row whose h equals h_prev (the previous layer skipped, or layer 0) PROCESSes;
    else cos = cosine(h, h_prev) in float32 gives EXIT at >= exit_saturation, SKIP at >=
    skip_saturation. budget_left < exit_threshold gives EXIT whatever the rest. Returns int8 [N].
    """
    after_skip = (h == h_prev).all(dim=-1)
    cos = F.cosine_similarity(h.float(), h_prev.float(), dim=-1)
    leave = (~after_skip & (cos >= exit_saturation)) | (budget_left < exit_threshold)
    skip = ~after_skip & (cos >= skip_saturation)
    return torch.where(leave, EXIT, torch.where(skip, SKIP, PROCESS)).to(torch.int8)


# ---- the trained controller (control/trained.py): its features, its net and its rule ----------

CONTROLLER_FEATURES = ("log_norm", "log_delta", "log_var", "cos_prev", "budget", "budget_left",
                       "affordable", "layers_left")
_CONTROLLER_EPS = 1e-6
_AFFORDABLE = CONTROLLER_FEATURES.index("affordable")


def affordable_fraction(budget_left, layer: int, num_layers: int, skip_cost: float):
    """[N]: the share of the layers from `layer` on that the token can still PROCESS (1 = all)."""
    remaining = num_layers - layer
    extra = budget_left * num_layers - remaining * skip_cost
    return extra / (remaining * (1.0 - skip_cost))


def normalised(h: torch.Tensor) -> torch.Tensor:
    """h in float32, RMS-normalised over its last dimension: h * rsqrt(mean(h^2) + eps)."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _CONTROLLER_EPS)


def controller_features(h, h_prev, budget, budget_left, layer: int, num_layers: int,
                        skip_cost: float):
    """(scalars [N, len(CONTROLLER_FEATURES)], normalised h [N, hidden]), in float32: what the
    trained controller's net reads. The one definition: training computes them so too."""
    h, h_prev, budget_left = h.float(), h_prev.float(), budget_left.float()
    L = num_layers
    scalars = torch.stack([
        torch.log1p(h.norm(dim=-1)),
        torch.log1p((h - h_prev).norm(dim=-1)),
        torch.log1p(h.var(dim=-1)),
        F.cosine_similarity(h, h_prev, dim=-1),
        budget.float(),
        budget_left,
        affordable_fraction(budget_left, layer, L, skip_cost).clamp(-1.0, 2.0),
        torch.full_like(budget_left, (L - layer) / L),
    ], dim=-1)
    return scalars, normalised(h)


def controller_logit(scalars, normed, scalar_mean, scalar_std, proj_weight, inp_weight, inp_bias,
                     layer_bias, hidden_weight, hidden_bias, out_weight, out_bias):
    """[N] logit of PROCESS: the trained controller's MLP on its features (layer_bias: the layer
    embedding's row(s)). Differentiable: ControllerNet.forward is this."""
    x = (scalars - scalar_mean) / scalar_std
    z = F.relu(F.linear(torch.cat([x, F.linear(normed, proj_weight)], dim=-1), inp_weight, inp_bias)
               + layer_bias)
    return F.linear(F.relu(F.linear(z, hidden_weight, hidden_bias)), out_weight, out_bias).squeeze(-1)


def static_skip_count(budget, num_layers: int, order_length: int, skip_cost: float):
    """[N] long: how many of the order_length decidable layers a static set leaves unpaid
    (SKIPs) at each token's budget; the other num_layers - order_length always run."""
    L, D = num_layers, order_length
    limit = budget.float() * L - (L - D) - D * skip_cost
    processable = torch.floor(limit / (1.0 - skip_cost) + _CONTROLLER_EPS).clamp(0, D)
    return (D - processable).long()


def budget_controller(h, h_prev, budget, budget_left, scalar_mean, scalar_std, proj_weight,
                      inp_weight, inp_bias, layer_weight, hidden_weight, hidden_bias, out_weight,
                      out_bias, layer: int, num_layers: int, skip_cost: float,
                      order_position: int, order_length: int, margin: float,
                      net_min_budget: float, net_max_budget: float, exit_threshold: float):
    """The trained controller's proposals (control/trained.py) for every token at one layer, as
    one op: about 110 tiny tensor ops per layer otherwise.

    h, h_prev [N, hidden]: the residual entering this layer and the previous one (any float
    dtype, computed in float32); budget [N] float32: each token's whole budget, budget_left [N]
    float32 what it may still spend (fractions of a full forward). The net (float32 tensors, as
    ControllerNet holds them): scalar_mean, scalar_std [8]; proj_weight [proj_dim, hidden];
    inp_weight [width, 8 + proj_dim], inp_bias [width]; layer_weight [num_layers, width] (the
    layer embedding: row `layer` is added); hidden_weight [width, width], hidden_bias [width];
    out_weight [1, width], out_bias [1].

    PROCESS where the logit is > 0. Static fallback, where margin >= 0: a token whose |logit| <=
    margin, or whose budget is outside [net_min_budget, net_max_budget], follows the static set
    of its budget, which SKIPs the first static_skip_count layers of an order of order_length
    layers; order_position is this layer's place in that order (-1: not in it, the set runs
    it). margin < 0: no fallback. Then PROCESS wherever the token can still pay for every
    remaining layer, and EXIT where budget_left < exit_threshold.
    Returns int8 [N] codes.
    """
    check_budget_controller_args(h, h_prev, budget, budget_left, scalar_mean, scalar_std,
                                 proj_weight, inp_weight, inp_bias, layer_weight, hidden_weight,
                                 hidden_bias, out_weight, out_bias, layer, num_layers, skip_cost,
                                 order_position, order_length)
    scalars, normed = controller_features(h, h_prev, budget, budget_left, layer, num_layers,
                                          skip_cost)
    logit = controller_logit(scalars, normed, scalar_mean, scalar_std, proj_weight, inp_weight,
                             inp_bias, layer_weight[layer], hidden_weight, hidden_bias, out_weight,
                             out_bias)
    process = logit > 0
    if margin >= 0:
        static = (torch.ones_like(process) if order_position < 0 else
                  order_position >= static_skip_count(budget, num_layers, order_length, skip_cost))
        trusted = ((logit.abs() > margin) & (budget >= net_min_budget)
                   & (budget <= net_max_budget))
        process = torch.where(trusted, process, static)
    free = scalars[:, _AFFORDABLE] >= 1.0 - _CONTROLLER_EPS
    leave = budget_left < exit_threshold
    process = (process | free) & ~leave
    return torch.where(leave, EXIT, torch.where(process, PROCESS, SKIP)).to(torch.int8)


def check_budget_controller_args(h, h_prev, budget, budget_left, scalar_mean, scalar_std,
                                 proj_weight, inp_weight, inp_bias, layer_weight, hidden_weight,
                                 hidden_bias, out_weight, out_bias, layer: int, num_layers: int,
                                 skip_cost: float, order_position: int, order_length: int):
    """budget_controller's shapes, dtypes, devices and numbers (csrc/op_checks.h checks the same
    for the native op): a misshapen weight would otherwise broadcast into a wrong decision."""
    if (h.dim() != 2 or h_prev.shape != h.shape or h_prev.dtype != h.dtype
            or not h.is_floating_point()):
        raise ValueError(f"budget_controller: h and h_prev must be floating [N, hidden] of one "
                         f"shape and dtype, got {h.dtype} {list(h.shape)} and {h_prev.dtype} "
                         f"{list(h_prev.shape)}")
    if h_prev.device != h.device:
        raise ValueError(f"budget_controller: h_prev is on {h_prev.device}, h on {h.device}")
    if proj_weight.dim() != 2 or inp_weight.dim() != 2:
        raise ValueError(f"budget_controller: proj_weight must be [proj_dim, hidden] and "
                         f"inp_weight [width, {len(CONTROLLER_FEATURES)} + proj_dim], got "
                         f"{list(proj_weight.shape)} and {list(inp_weight.shape)}")
    (n, hidden), proj_dim, width = h.shape, proj_weight.shape[0], inp_weight.shape[0]
    features = len(CONTROLLER_FEATURES)
    for name, t, shape in (
            ("budget", budget, [n]), ("budget_left", budget_left, [n]),
            ("scalar_mean", scalar_mean, [features]), ("scalar_std", scalar_std, [features]),
            ("proj_weight", proj_weight, [proj_dim, hidden]),
            ("inp_weight", inp_weight, [width, features + proj_dim]), ("inp_bias", inp_bias, [width]),
            ("layer_weight", layer_weight, [num_layers, width]),
            ("hidden_weight", hidden_weight, [width, width]), ("hidden_bias", hidden_bias, [width]),
            ("out_weight", out_weight, [1, width]), ("out_bias", out_bias, [1])):
        if t.dtype != torch.float32 or list(t.shape) != shape or t.device != h.device:
            raise ValueError(f"budget_controller: {name} must be float32 {shape} on {h.device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"budget_controller: layer {layer} is out of range for {num_layers} layers")
    if not 0 <= skip_cost < 1:
        raise ValueError(f"budget_controller: skip_cost must be in [0, 1), got {skip_cost}")
    if not (0 <= order_length <= num_layers and -1 <= order_position < order_length):
        raise ValueError(f"budget_controller: order_position must be -1 or in [0, order_length) "
                         f"and order_length in [0, num_layers], got {order_position} and "
                         f"{order_length} for {num_layers} layers")
