"""The adaptive-depth forward over a ragged batch of tokens, reading and writing the paged cache.

Every layer, for every token: K/V come from norm(h_in) and go into the cache (`skip_kv`, the
whole SKIP path in one op). PROCESS rows then take the block's output; the others keep h_in
(plus the layer's skip adapter, when the model has adapters: model/adapters.py).
Where the block runs on every row (masked, on a GPU; compacted, at a layer every row
PROCESSes) the same skip_kv launch also gives every row's query (one K|V|Q product, RoPE
included), so the block starts at attention. Masked, the out and down projections take the
PROCESS mask as linear's row_mask: a SKIP row adds nothing to its residual, with no `where`
launch of its own. A token that EXITed keeps its residual, so the same per-layer launch writes
its remaining layers' K/V. (Filling them all in one launch after the loop would read those
layers' weights a second time, and the per-layer launches happen anyway for the other rows.)

One code path serves prefill, chunked prefill and decode: a step's K/V are written before
attention reads the cache, so a query sees exactly positions 0..p of its own sequence. `ops` is
a backend's op set (ops/reference.py defines the contract).
"""
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.reference import rope_cos_sin, rotate
from ..ops.weight_formats import QuantizedWeight, dequantize_rows


@dataclass
class StepBatch:
    """One step's tokens, flattened; every field a kernel reads is a device tensor."""
    token_ids: torch.Tensor        # [N] long
    positions: torch.Tensor        # [N] long
    seq_idx: torch.Tensor          # [N] long: the row of block_tables each token belongs to
    slot_mapping: torch.Tensor     # [N] long, -1 = padding
    block_tables: torch.Tensor     # [S, max_blocks] long
    block_size: int
    decode: bool = False           # one token per sequence: no token reads another's K/V

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


def embed(weights, step: StepBatch):
    if isinstance(weights.embed, QuantizedWeight):       # reads only the step's rows
        h = dequantize_rows(weights.embed, step.token_ids).to(weights.dtype)
    else:                                # bfloat16 weights may serve float32 activations
        h = F.embedding(step.token_ids, weights.embed).to(weights.dtype)
    if weights.pos_embed is not None:
        h = h + F.embedding(step.positions, weights.pos_embed)
    return h


def run_layers(weights, cache, step: StepBatch, policy, ops,
               hidden_states: Optional[list] = None, compact: Optional[bool] = None,
               layer_guard=None, row_caps: tuple = ()):
    """Runs every layer under `policy`; returns the final residual [N, hidden].

    `hidden_states`, when given, receives the residual entering each layer (for profiling and
    tests). The layer loop never reads a device value on the host: on a GPU the block runs on
    every row and only the PROCESS rows' residuals change (masked). On the CPU, where "device" and host
    are the same memory, the block runs on the PROCESS rows only (compacted), so skipped work
    is really saved. `compact` forces one variant (None: by device).

    `layer_guard(pred, body)` (masked variant only) runs body() only where the device bool
    pred holds, as a CUDA graph's conditional node does (engine/cuda_graphs.py: run_only_if); each layer's
    block then runs under it and updates h in place (see _guarded_block, which also explains
    `row_caps`), so h_prev is a copy, made only for a policy that reads it.
    """
    spec = weights.spec
    rms = spec.norm == "rmsnorm"
    inv_freq = weights.rope_inv_freq if spec.uses_rope else None
    if compact is None:
        compact = step.token_ids.device.type == "cpu"
    if compact and layer_guard is not None:
        raise ValueError("layer_guard wraps the masked variant's blocks: pass compact=False")
    if row_caps and layer_guard is None:
        raise ValueError("row_caps choose among guarded blocks: give a layer_guard too")
    if layer_guard is not None and hidden_states is not None:
        raise ValueError("hidden_states records unguarded layer loops: h is updated in place "
                         "under a layer_guard")
    h = embed(weights, step)
    h_prev = h
    n = h.shape[0]
    # Every row's query comes out of skip_kv (one K|V|Q product), into one buffer reused by
    # every layer: always when masked; compacted, where every row PROCESSes the layer. Fewer
    # rows project their own queries in the block, RoPE'd with the step's (cos, sin) tables.
    queries = h.new_empty((n, spec.num_heads, spec.head_dim))
    # Compacted, made on first use (a one-row decode step never needs the tables): the step's
    # RoPE tables, and the skip adapters' row mask of a layer that no row PROCESSes.
    rope = functools.cache(lambda: None if inv_freq is None else
                           rope_cos_sin(step.positions, inv_freq, weights.rope_scale))
    every_row = functools.cache(lambda: torch.ones(n, dtype=torch.bool, device=h.device))
    for l, layer in enumerate(weights.layers):
        if hidden_states is not None:
            hidden_states.append(h)
        process = policy.decide(l, h, h_prev)
        if compact:                       # the CPU: reading the rows on the host is free
            # The PROCESS rows [count, 1]; one row's flag is read as a Python bool, with no op.
            rows = process.nonzero() if n > 1 else None
            count = rows.shape[0] if n > 1 else int(bool(process))
            q = queries if count == n else None
        else:
            q = queries
        ops.skip_kv(h, *weights.skip_kv_weights(l, with_q=q is not None), step.positions, inv_freq,
                    weights.rope_scale, cache.k[l], cache.v[l], step.slot_mapping, spec.norm_eps,
                    rms, q)
        if layer_guard is None:
            h_prev = h
        else:                             # the guarded block updates h in place
            h_prev = h.clone() if policy.reads_h_prev else None
        if compact:                       # a layer whose rows all go one way: no row op
            if weights.adapters is not None and count < n:
                h = _skip_adapter(weights, l, h, ~process if count else every_row(), ops)
            if count == n:                # every row: no gather, no scatter
                h = _block(weights, layer, cache, l, step, h, None, ops, q=q)
            elif count:
                rows = rows.squeeze(1)
                out = _block(weights, layer, cache, l, step, h[rows], rows, ops, rope=rope())
                h = h.index_copy(0, rows, out)
        elif layer_guard is not None:
            if weights.adapters is not None:
                h.copy_(_skip_adapter(weights, l, h, ~process, ops))
            _guarded_block(weights, layer, cache, l, step, h, q, process, ops, layer_guard,
                           row_caps)
        else:
            if weights.adapters is not None:
                h = _skip_adapter(weights, l, h, ~process, ops)
            h = _block(weights, layer, cache, l, step, h, None, ops, q=q, row_mask=process)
    return h


def _skip_adapter(weights, l, h, skipping, ops):
    """h with layer l's skip adapter added to the rows in `skipping` (the others unchanged: the
    block then replaces them); it reads norm(h) like skip_kv."""
    layer, adapter = weights.layers[l], weights.adapters[l]
    return ops.skip_adapter(h, layer.attn_norm_weight, layer.attn_norm_bias, adapter.down,
                            adapter.up, adapter.bias, skipping, weights.spec.norm_eps,
                            weights.spec.norm == "rmsnorm")


def _guarded_block(weights, layer, cache, l, step, h, q, process, ops, guard, row_caps):
    """The masked variant's block under guard(pred, body), which runs body() only where the
    device bool pred holds. Without row_caps: one body on every row, run when some row processes
    the layer. With row_caps (ascending, each below the step's N rows): the rows are ordered
    PROCESS first, and of the bodies for capacities row_caps + (N,), only the one whose range
    holds the PROCESS count runs the block, on that many leading rows (a device-side row count
    with fixed-capacity launches). A body updates h in place (its PROCESS rows), so where no
    body runs h is unchanged without a copy."""
    if not row_caps:
        def every_row():
            h.copy_(_block(weights, layer, cache, l, step, h, None, ops, q=q, row_mask=process))
        # One row: its PROCESS flag is the predicate (a view: no kernel of its own).
        guard(process[0] if process.shape[0] == 1 else process.any(), every_row)
        return
    order = torch.argsort((~process).to(torch.int8), stable=True)     # PROCESS rows first
    count = process.sum()
    low = 0
    for cap in (*row_caps, h.shape[0]):
        def leading_rows(rows=order[:cap]):
            h[rows] = _block(weights, layer, cache, l, step, h[rows], rows, ops, q=q[rows],
                             row_mask=process[rows])
        guard((count > low) & (count <= cap), leading_rows)
        low = cap


def _block(weights, layer, cache, l, step, h, rows, ops, q=None, rope=None, row_mask=None):
    """Attention (over the cache this layer's K/V were just written to) + MLP for the rows
    `rows` of the step (all rows when None); h holds those rows' residuals. q: their queries
    when skip_kv gave them; else they are projected here (rope: the step's (cos, sin) tables,
    or None without RoPE). row_mask: the rows whose residual the block changes (all when None);
    the others come back as they went in."""
    spec = weights.spec
    rms = spec.norm == "rmsnorm"
    positions = step.positions if rows is None else step.positions[rows]
    seq_idx = step.seq_idx if rows is None else step.seq_idx[rows]
    n = h.shape[0]
    if q is None:
        x = ops.norm(h, layer.attn_norm_weight, layer.attn_norm_bias, spec.norm_eps, rms)
        q = ops.linear(x, layer.q_weight, layer.q_bias).view(n, spec.num_heads, spec.head_dim)
        if rope is not None:
            q = rotate(q, *(rope if rows is None else (rope[0][rows], rope[1][rows])))
    attn = ops.paged_attention(q, cache.k[l], cache.v[l], step.block_tables, seq_idx, positions,
                               step.block_size, spec.attn_scale, layer.sliding_window or 0)
    o = ops.linear(attn.reshape(n, -1), layer.o_weight, layer.o_bias, row_mask=row_mask)
    h_attn, x = ops.add_norm(o, h, layer.mlp_norm_weight, layer.mlp_norm_bias, spec.norm_eps, rms)
    # The MLP: gated SiLU (Llama family) or GELU-tanh (GPT-2), then back into the residual.
    hidden = ops.linear(x, layer.up_weight, layer.up_bias, _ACTIVATION[spec.activation])
    return ops.linear(hidden, layer.down_weight, layer.down_bias, residual=h_attn,
                      row_mask=row_mask)


_ACTIVATION = {"silu": "silu_gated", "gelu_tanh": "gelu_tanh"}   # ModelSpec's -> linear's


def final_logits(weights, h, ops):
    """float32 logits of lm_head(final_norm(h))."""
    spec = weights.spec
    x = ops.norm(h, weights.final_norm_weight, weights.final_norm_bias, spec.norm_eps,
                 spec.norm == "rmsnorm")
    return ops.linear(x, weights.lm_head).float()
