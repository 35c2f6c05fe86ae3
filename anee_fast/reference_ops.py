"""Pure-PyTorch ops: the ground truth every Triton and C++/CUDA kernel is tested against."""
from typing import Optional

import torch
import torch.nn.functional as F


def norm(x, weight, bias, kind: str, eps: float):
    if kind == "rmsnorm":
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * weight.float()).to(x.dtype) if bias is None else (xf * weight.float() + bias.float()).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def apply_rope(x, positions, inv_freq, scale: float = 1.0):
    """Rotary embedding in the rotate-half layout (Llama): x [N, heads, head_dim]."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * scale)[:, None, :]
    sin = (emb.sin() * scale)[:, None, :]
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def kvq_projection(x, layer, spec, positions, inv_freq, rope_scale):
    """Returns K, V, Q as [N, heads, head_dim], RoPE applied to K and Q where the model uses it."""
    out = F.linear(x, layer.kvq_weight, layer.kvq_bias)
    kv = spec.kv_size
    k = out[:, :kv].reshape(-1, spec.num_kv_heads, spec.head_dim)
    v = out[:, kv:2 * kv].reshape(-1, spec.num_kv_heads, spec.head_dim)
    q = out[:, 2 * kv:].reshape(-1, spec.num_heads, spec.head_dim)
    if spec.uses_rope:
        k = apply_rope(k, positions, inv_freq, rope_scale)
        q = apply_rope(q, positions, inv_freq, rope_scale)
    return k, v, q


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Copies K/V rows into one layer's slot arrays; slot -1 (padding) goes to the spare last
    slot, which no sequence owns, so the write needs no host-side filtering."""
    slots = torch.where(slot_mapping >= 0, slot_mapping, k_cache.shape[0] - 1)
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def context_slots(block_table_row, context_len: int, block_size: int):
    """Cache slots of positions 0..context_len-1 of one sequence."""
    pos = torch.arange(context_len, device=block_table_row.device)
    return block_table_row[pos // block_size] * block_size + pos % block_size


def paged_attention(q, k_cache, v_cache, positions, attn, scale: float,
                    sliding_window: Optional[int] = None):
    """Causal attention of each query over its own sequence's cached K/V.

    q: [N, heads, d]; `attn` holds block tables and the host-side ragged layout of the step
    (query_starts, context_lens), which the scheduler knows before the step runs.
    """
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    for s, ctx in enumerate(attn.context_lens):
        start, end = attn.query_starts[s], attn.query_starts[s + 1]
        if start == end:
            continue
        slots = context_slots(attn.block_tables[s], ctx, attn.block_size)
        k = k_cache[slots].repeat_interleave(heads // kv_heads, dim=1)   # [ctx, heads, d]
        v = v_cache[slots].repeat_interleave(heads // kv_heads, dim=1)
        q_pos = positions[start:end, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def mlp(x, layer, activation: str):
    up = F.linear(x, layer.up_weight, layer.up_bias)
    if activation == "silu":
        gate, up = up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
    else:
        hidden = F.gelu(up, approximate="tanh")
    return F.linear(hidden, layer.down_weight, layer.down_bias)
