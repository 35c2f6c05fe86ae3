"""skip_kv: one layer's SKIP path in one launch.

For every row n with slot_mapping[n] >= 0:
    x = norm(h[n]);  k|v = W x + b;  k = rope(k);  cache[slot] = k, v.
With q_out, W also holds the Q rows and every row's rope(q) goes to q_out.
Grid: (row tiles of BLOCK_M, (2 * kv_heads + q_heads) * column chunks): a program produces
BLOCK_HALF columns of each half of one K, V or Q head for BLOCK_M rows, so each weight tile it
loads serves BLOCK_M rows, and a single decode row still spreads over enough programs
to keep the GPU's memory system busy (GPT-2 small: 24 heads x 8 chunks). It recomputes its rows'
norm statistics (h is tiny next to the weights), then runs the GEMM over the hidden dim in
BLOCK_K chunks, normalising x on the fly (norm fused into the prologue). One row: a broadcast
multiply-sum on CUDA cores; more rows: tiles of 16 to 64 rows through tl.dot (tensor cores;
float32 with IEEE precision, no TF32). Measured on an H100 (docs/gpu-results.md).
The head is computed as two halves, so rotate-half RoPE needs no register shuffles:
    k1' = k1 cos - k2 sin,   k2' = k2 cos + k1 sin   (cos/sin of the half's frequencies).
A K/V program none of whose rows has a slot (slot -1) loads and stores nothing; rows without
one in a partly active tile store nothing. Q programs serve every row.
kv_weight, the caches and q_out are addressed through their strides: the K|V rows are a view of
the layer's K|V|Q matrix and each cache one layer of the whole cache.
"""
import torch
import triton
import triton.language as tl

from anee_fast.ops.reference import check_skip_kv_args

from .norm import row_stats


@triton.jit
def _store_halves(dst, stride_d, r, half, a, b, mask_a, mask_b):
    """Columns r of a head's first half (a) and r + half of its second (b), rows at dst."""
    tl.store(dst + r[None, :] * stride_d, a.to(dst.dtype.element_ty), mask=mask_a)
    tl.store(dst + (half + r[None, :]) * stride_d, b.to(dst.dtype.element_ty), mask=mask_b)


@triton.jit
def _skip_kv_kernel(h_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, pos_ptr, inv_freq_ptr,
                    k_cache_ptr, v_cache_ptr, slot_ptr, q_ptr,
                    N, H, D, KV_HEADS, rope_scale, eps,
                    stride_hn, stride_wr, stride_wk, stride_kcs, stride_kch, stride_kcd,
                    stride_vcs, stride_vch, stride_vcd, stride_qn, stride_qh, stride_qd,
                    RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, IS_FP32: tl.constexpr):
    chunks = tl.cdiv(D - D // 2, BLOCK_HALF)
    tile = tl.program_id(1) // chunks       # K heads, then V heads, then Q heads
    chunk = tl.program_id(1) % chunks       # which BLOCK_HALF columns of each half of the head
    is_q = tile >= 2 * KV_HEADS
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    slot = tl.load(slot_ptr + rows, mask=rm, other=-1).to(tl.int64)
    active = rm & ((slot >= 0) | (rows * 0 + tile >= 2 * KV_HEADS))   # a block: Q rows all
    if tl.max(active.to(tl.int32), axis=0) > 0:
        h_rows = h_ptr + rows[:, None] * stride_hn
        cols = tl.arange(0, BLOCK_K)
        mean, rstd = row_stats(h_rows, active, H, eps, RMS, BLOCK_M, BLOCK_K)

        # GEMM of this chunk of the head's two halves: weight rows tile*D + r and tile*D + half + r.
        half = D // 2
        r = chunk * BLOCK_HALF + tl.arange(0, BLOCK_HALF)
        wrows1 = tile * D + r
        wrows2 = tile * D + half + r
        m1 = r < half
        m2 = r < D - half
        acc1 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
        for start in range(0, H, BLOCK_K):
            km = start + cols < H
            xm = active[:, None] & km[None, :]
            x = tl.load(h_rows + start + cols[None, :], mask=xm, other=0.0).to(tl.float32)
            g = tl.load(nw_ptr + start + cols, mask=km, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * g[None, :]
            if HAS_NORM_BIAS:
                y += tl.load(nb_ptr + start + cols, mask=km, other=0.0).to(tl.float32)[None, :]
            # The reference rounds norm's output to the model dtype before the projection.
            y = tl.where(xm, y.to(h_ptr.dtype.element_ty).to(tl.float32), 0.0)
            kk = (start + cols) * stride_wk
            w1 = tl.load(w_ptr + wrows1[:, None] * stride_wr + kk[None, :],
                         mask=m1[:, None] & km[None, :], other=0.0)
            w2 = tl.load(w_ptr + wrows2[:, None] * stride_wr + kk[None, :],
                         mask=m2[:, None] & km[None, :], other=0.0)
            if USE_DOT:     # many rows: tensor cores in the weights' dtype (float32: exact IEEE)
                yd = y.to(w_ptr.dtype.element_ty)
                if IS_FP32:
                    acc1 += tl.dot(yd, tl.trans(w1), input_precision="ieee")
                    acc2 += tl.dot(yd, tl.trans(w2), input_precision="ieee")
                else:
                    acc1 += tl.dot(yd, tl.trans(w1))
                    acc2 += tl.dot(yd, tl.trans(w2))
            else:
                acc1 += tl.sum(y[:, None, :] * w1.to(tl.float32)[None, :, :], axis=2)
                acc2 += tl.sum(y[:, None, :] * w2.to(tl.float32)[None, :, :], axis=2)
        if HAS_BIAS:
            acc1 += tl.load(b_ptr + wrows1, mask=m1, other=0.0).to(tl.float32)[None, :]
            acc2 += tl.load(b_ptr + wrows2, mask=m2, other=0.0).to(tl.float32)[None, :]
        # The reference's projection output is in the model dtype: round like it does.
        acc1 = acc1.to(k_cache_ptr.dtype.element_ty).to(tl.float32)
        acc2 = acc2.to(k_cache_ptr.dtype.element_ty).to(tl.float32)

        sm1 = active[:, None] & m1[None, :]
        sm2 = active[:, None] & m2[None, :]
        if (tile < KV_HEADS) | is_q:        # a K or Q head: RoPE, then the K cache or q_out
            if ROPE:
                pos = tl.load(pos_ptr + rows, mask=rm, other=0).to(tl.float32)
                inv = tl.load(inv_freq_ptr + r, mask=m1, other=0.0).to(tl.float32)
                angle = pos[:, None] * inv[None, :]
                cos = tl.cos(angle) * rope_scale
                sin = tl.sin(angle) * rope_scale
                k1 = acc1 * cos - acc2 * sin
                k2 = acc2 * cos + acc1 * sin
            else:
                k1 = acc1
                k2 = acc2
            if is_q:
                _store_halves(q_ptr + rows[:, None] * stride_qn + (tile - 2 * KV_HEADS) * stride_qh,
                              stride_qd, r, half, k1, k2, sm1, sm2)
            else:
                _store_halves(k_cache_ptr + slot[:, None] * stride_kcs + tile * stride_kch,
                              stride_kcd, r, half, k1, k2, sm1, sm2)
        else:                               # a V head: straight to the V cache
            _store_halves(v_cache_ptr + slot[:, None] * stride_vcs + (tile - KV_HEADS) * stride_vch,
                          stride_vcd, r, half, acc1, acc2, sm1, sm2)


def _block_m(n: int) -> int:
    """Rows per program: 1 for one row (CUDA cores); else 16 to 64 rows, a tl.dot tile."""
    return 1 if n == 1 else min(max(triton.next_power_of_2(n), 16), 64)


def skip_kv(h, norm_weight, norm_bias, kv_weight, kv_bias, positions, inv_freq, rope_scale: float,
            k_cache, v_cache, slot_mapping, eps: float, rms: bool, q_out=None):
    """See ops/reference.py:skip_kv. h [N, hidden]; norm weights [hidden]; kv_weight [rows,
    hidden]; caches [slots+1, kv_heads, d]; q_out [N, heads, d] or None."""
    check_skip_kv_args(h, norm_weight, norm_bias, kv_weight, kv_bias, k_cache, v_cache, q_out)
    n, hidden = h.shape
    _, kv_heads, d = k_cache.shape
    q_heads = 0 if q_out is None else q_out.shape[1]
    if n == 0:
        return
    if h.stride(-1) != 1:
        h = h.contiguous()
    if norm_weight.stride(-1) != 1:
        norm_weight = norm_weight.contiguous()
    if norm_bias is not None and norm_bias.stride(-1) != 1:
        norm_bias = norm_bias.contiguous()
    if kv_bias is not None and kv_bias.stride(-1) != 1:
        kv_bias = kv_bias.contiguous()
    rope = inv_freq is not None
    if rope:
        assert d % 2 == 0, "RoPE needs an even head dim"
        inv_freq = inv_freq.contiguous()
    block_m = _block_m(n)
    use_dot = block_m > 1
    # Columns per half of a head: few rows take narrow chunks (4; tl.dot needs 16), for many
    # programs; past 64 rows the whole half, so h is re-read by fewer programs.
    whole = triton.next_power_of_2(max(d - d // 2, 1))
    block_half = min(whole, 4) if not use_dot else 16 if n <= 64 else max(whole, 16)
    block_k = 64 if use_dot else max(16, min(triton.next_power_of_2(hidden), 256))
    chunks = triton.cdiv(d - d // 2, block_half)
    grid = (triton.cdiv(n, block_m), (2 * kv_heads + q_heads) * chunks)
    _skip_kv_kernel[grid](
        h, norm_weight, norm_weight if norm_bias is None else norm_bias,
        kv_weight, kv_weight if kv_bias is None else kv_bias,
        positions, h if inv_freq is None else inv_freq,
        k_cache, v_cache, slot_mapping, k_cache if q_out is None else q_out,
        n, hidden, d, kv_heads, float(rope_scale), float(eps),
        h.stride(0), *kv_weight.stride(), *k_cache.stride(), *v_cache.stride(),
        *((0, 0, 0) if q_out is None else q_out.stride()),
        RMS=bool(rms), HAS_NORM_BIAS=norm_bias is not None, HAS_BIAS=kv_bias is not None,
        ROPE=rope, BLOCK_M=block_m, BLOCK_HALF=block_half, BLOCK_K=block_k, USE_DOT=use_dot,
        IS_FP32=kv_weight.dtype == torch.float32, num_warps=4)
