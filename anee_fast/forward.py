"""The adaptive-depth forward over a ragged batch of tokens, reading and writing the paged cache.

Every layer, for every token: K/V come from norm(h_in) and go into the cache. PROCESS rows then
take the block's output; the others keep h_in (h = where(process, block(h), h)). One code path
serves prefill, chunked prefill and decode: a step's tokens are written to the cache before
attention reads it, so a query sees exactly the positions 0..p of its own sequence.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import reference_ops as ops


@dataclass
class StepBatch:
    """One step's tokens, flattened: the tokens of sequence s are query_starts[s]:query_starts[s+1]."""
    token_ids: torch.Tensor        # [N] long
    positions: torch.Tensor        # [N] long
    slot_mapping: torch.Tensor     # [N] long, -1 = padding
    block_tables: torch.Tensor     # [S, max_blocks] long
    query_starts: list             # host ints, S + 1 entries
    context_lens: list             # host ints: tokens of sequence s in the cache after this step
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


def embed(weights, step: StepBatch):
    h = F.embedding(step.token_ids, weights.embed)
    if weights.pos_embed is not None:
        h = h + F.embedding(step.positions, weights.pos_embed)
    return h


def run_layers(weights, cache, step: StepBatch, policy, hidden_states: Optional[list] = None):
    """Runs every layer under `policy`; returns the final residual [N, hidden].

    `hidden_states`, when given, receives the residual entering each layer (for profiling and
    tests). The layer loop never reads a device value on the host.
    """
    spec = weights.spec
    h = embed(weights, step)
    h_prev = h
    for l, layer in enumerate(weights.layers):
        if hidden_states is not None:
            hidden_states.append(h)
        process = policy.decide(l, h, h_prev)
        x = ops.norm(h, layer.attn_norm_weight, layer.attn_norm_bias, spec.norm, spec.norm_eps)
        k, v, q = ops.kvq_projection(x, layer, spec, step.positions, weights.rope_inv_freq,
                                     weights.rope_scale)
        ops.write_kv(cache.k[l], cache.v[l], k, v, step.slot_mapping)
        attn = ops.paged_attention(q, cache.k[l], cache.v[l], step.positions, step, spec.attn_scale,
                                   layer.sliding_window)
        h_attn = h + F.linear(attn.reshape(attn.shape[0], -1), layer.o_weight, layer.o_bias)
        x = ops.norm(h_attn, layer.mlp_norm_weight, layer.mlp_norm_bias, spec.norm, spec.norm_eps)
        h_out = h_attn + ops.mlp(x, layer, spec.activation)
        h_prev = h
        h = torch.where(process[:, None], h_out, h)
    return h


def final_logits(weights, h):
    """float32 logits of lm_head(final_norm(h))."""
    spec = weights.spec
    x = ops.norm(h, weights.final_norm_weight, weights.final_norm_bias, spec.norm, spec.norm_eps)
    return F.linear(x, weights.lm_head).float()
