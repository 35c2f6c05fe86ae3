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
float32 with IEEE precision, no TF32; weights of another dtype than h, whose product the
reference takes in float32, are converted to float32 first). Measured on an H100
(docs/gpu-results.md).
A quantized kv_weight (ops/weight_formats.py): up to _GEMV_ROWS rows, the program reads its
weight rows' bytes and dequantizes them in registers a block of 32 values at a time
(kernels/weight_formats.py), every row of the tile against them in a float32 multiply-sum; it
is the decode step's bytes that count. More rows: the weight is dequantized to float32 by one
launch and the tl.dot path above takes it, as the reference's float32 product.
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
from anee_fast.ops.weight_formats import format_of

from .norm import row_stats
from .weight_formats import block_values, dequantize, row_scale

_GEMV_ROWS = 8      # up to this many rows a quantized weight is dequantized in registers, as
                    # in linear


@triton.jit
def _store_halves(dst, stride_d, r, half, a, b, mask_a, mask_b):
    """Columns r of a head's first half (a) and r + half of its second (b), rows at dst."""
    tl.store(dst + r[None, :] * stride_d, a.to(dst.dtype.element_ty), mask=mask_a)
    tl.store(dst + (half + r[None, :]) * stride_d, b.to(dst.dtype.element_ty), mask=mask_b)


@triton.jit
def _normed(h_rows, active, nw_ptr, nb_ptr, mean, rstd, k, H, HAS_NORM_BIAS: tl.constexpr):
    """norm(h) at columns k of the rows h_rows [BLOCK_M, 1] (active, mean and rstd alike), in
    float32 after rounding to h's dtype (the reference rounds norm's output before the
    projection); 0 where masked. [BLOCK_M, len(k)]; [BLOCK_M, 1, len(k)] from rows given as
    [BLOCK_M, 1, 1] (the quantized GEMV's, in the layout of its product)."""
    km = k < H
    xm = active & km
    x = tl.load(h_rows + k, mask=xm, other=0.0).to(tl.float32)
    g = tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * g
    if HAS_NORM_BIAS:
        y += tl.load(nb_ptr + k, mask=km, other=0.0).to(tl.float32)
    return tl.where(xm, y.to(h_rows.dtype.element_ty).to(tl.float32), 0.0)


@triton.jit
def _skip_kv_kernel(h_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, pos_ptr, inv_freq_ptr,
                    k_cache_ptr, v_cache_ptr, slot_ptr, q_ptr,
                    N, H, D, KV_HEADS, rope_scale, eps,
                    stride_hn, stride_wr, stride_wk, stride_kcs, stride_kch, stride_kcd,
                    stride_vcs, stride_vch, stride_vcd, stride_qn, stride_qh, stride_qd,
                    RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, IS_FP32: tl.constexpr,
                    FORMAT: tl.constexpr):   # "dense", or the uint8 rows' format ("q4_0", ...)
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
        if FORMAT == "dense":
            for start in range(0, H, BLOCK_K):
                km = start + cols < H
                y = _normed(h_rows, active[:, None], nw_ptr, nb_ptr, mean[:, None],
                            rstd[:, None], start + cols, H, HAS_NORM_BIAS)
                kk = (start + cols) * stride_wk
                w1 = tl.load(w_ptr + wrows1[:, None] * stride_wr + kk[None, :],
                             mask=m1[:, None] & km[None, :], other=0.0)
                w2 = tl.load(w_ptr + wrows2[:, None] * stride_wr + kk[None, :],
                             mask=m2[:, None] & km[None, :], other=0.0)
                if USE_DOT:     # many rows: tensor cores in the weights' dtype (float32: IEEE)
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
        else:   # quantized rows, BLOCK_K // 32 blocks of 32 a step, dequantized in registers
            i = tl.arange(0, 16)
            h3 = h_rows[:, :, None]            # 3-D, [rows, weight rows, 16], as the product
            active3 = active[:, None, None]
            mean3 = mean[:, None, None]
            rstd3 = rstd[:, None, None]
            row1 = (w_ptr + wrows1 * stride_wr)[None, :, None]
            row2 = (w_ptr + wrows2 * stride_wr)[None, :, None]
            wm1 = m1[None, :, None]
            wm2 = m2[None, :, None]
            scale1 = row_scale(row1, wm1, FORMAT)
            scale2 = row_scale(row2, wm2, FORMAT)
            acc3_1 = tl.zeros([BLOCK_M, BLOCK_HALF, 16], dtype=tl.float32)   # reduced after the
            acc3_2 = tl.zeros([BLOCK_M, BLOCK_HALF, 16], dtype=tl.float32)   # loop, not per block
            for first in range(0, tl.cdiv(H, 32), BLOCK_K // 32):
                for u in tl.static_range(BLOCK_K // 32):
                    k = (first + u) * 32 + i
                    y_lo = _normed(h3, active3, nw_ptr, nb_ptr, mean3, rstd3, k, H, HAS_NORM_BIAS)
                    y_hi = _normed(h3, active3, nw_ptr, nb_ptr, mean3, rstd3, k + 16, H,
                                   HAS_NORM_BIAS)
                    lo, hi = block_values(row1, wm1, scale1, first + u, H, FORMAT)
                    acc3_1 += y_lo * lo + y_hi * hi
                    lo, hi = block_values(row2, wm2, scale2, first + u, H, FORMAT)
                    acc3_2 += y_lo * lo + y_hi * hi
            acc1 = tl.sum(acc3_1, axis=2)
            acc2 = tl.sum(acc3_2, axis=2)
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
    fmt = format_of(kv_weight)
    if fmt != "dense" and n > _GEMV_ROWS:     # a GEMM: on the float32 weight (one launch)
        kv_weight, fmt = dequantize(kv_weight), "dense"
    if fmt == "dense":
        block_m = _block_m(n)
        use_dot = block_m > 1
        if use_dot and kv_weight.dtype not in (h.dtype, torch.float32):
            kv_weight = kv_weight.float()     # the reference's product: in float32
        w, w_strides = kv_weight, kv_weight.stride()
    else:                                     # its uint8 rows, dequantized in registers
        w, w_strides = kv_weight.data, kv_weight.data.stride()
        block_m = triton.next_power_of_2(n)
        use_dot = False
    # Columns per half of a head: few rows take narrow chunks (4; tl.dot needs 16), for many
    # programs; past 64 rows the whole half, so h is re-read by fewer programs.
    whole = triton.next_power_of_2(max(d - d // 2, 1))
    block_half = min(whole, 4) if not use_dot else 16 if n <= 64 else max(whole, 16)
    # Hidden columns a step; quantized: a multiple of 32 (BLOCK_K // 32 blocks, unrolled).
    block_k = 64 if use_dot else max(16 if fmt == "dense" else 32,
                                     min(triton.next_power_of_2(hidden), 256))
    chunks = triton.cdiv(d - d // 2, block_half)
    grid = (triton.cdiv(n, block_m), (2 * kv_heads + q_heads) * chunks)
    _skip_kv_kernel[grid](
        h, norm_weight, norm_weight if norm_bias is None else norm_bias,
        w, w if kv_bias is None else kv_bias,
        positions, h if inv_freq is None else inv_freq,
        k_cache, v_cache, slot_mapping, k_cache if q_out is None else q_out,
        n, hidden, d, kv_heads, float(rope_scale), float(eps),
        h.stride(0), *w_strides, *k_cache.stride(), *v_cache.stride(),
        *((0, 0, 0) if q_out is None else q_out.stride()),
        RMS=bool(rms), HAS_NORM_BIAS=norm_bias is not None, HAS_BIAS=kv_bias is not None,
        ROPE=rope, BLOCK_M=block_m, BLOCK_HALF=block_half, BLOCK_K=block_k, USE_DOT=use_dot,
        IS_FP32=w.dtype == torch.float32, FORMAT=fmt, num_warps=4)
