"""skip_adapter: the SKIP path's low-rank correction in one launch.

For every row n of h [N, hidden]:
    out[n] = h[n] + up_weight (down_weight norm(h[n])) + up_bias    where row_mask[n],
    out[n] = h[n] (its bits, whatever the adapter would give)        elsewhere.
One program per row. A row without the adapter copies h; the others recompute the row's norm
statistics (norm.row_stats), then z = norm(h) down^T over the hidden dim in BLOCK_K chunks
(normalising on the fly), then out = h + z up^T + up_bias in BLOCK_H chunks. Every step rounds
to h's dtype, as the reference's separate ops do. The mask is read on the device: no host sync,
one launch whatever the mask. Past _KERNEL_ROWS rows each program would re-read the weights, so
more rows run as the reference's norm -> two GEMMs (cuBLAS) -> where.
Weights are addressed through their strides (views of a larger matrix are fine).

Quantized down_weight and up_weight (ops/weight_formats.py, one format for both): the same
program reads their uint8 rows and dequantizes them in registers a block of 32 values at a time
(kernels/weight_formats.py), accumulating in float32 as the reference's float32 product does.
The down projection walks the hidden dim block by block against the rank rows, held as two
[BLOCK_R / 32, 16] sets (ranks 32 b + i and 32 b + 16 + i), so z comes out in exactly the two
halves that block_values gives of an up_weight row's block b: the up projection then takes all
of a BLOCK_H chunk's rank blocks at once, [BLOCK_H, BLOCK_R / 32, 16], with no shuffle of z.
Past _KERNEL_ROWS rows both weights are dequantized to float32 (one launch each) and the
reference's float32 products run on them.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from anee_fast.ops.reference import check_skip_adapter_args, norm
from anee_fast.ops.reference import skip_adapter as _unfused
from anee_fast.ops.weight_formats import format_of

from .norm import row_stats
from .weight_formats import block_values, dequantize, row_scale

_KERNEL_ROWS = 8
_TILE = 4096        # weight elements per loaded tile: BLOCK_R x BLOCK_K (or BLOCK_H)


@triton.jit
def _normed(h_row, nw_ptr, nb_ptr, mean, rstd, k, H, HAS_NORM_BIAS: tl.constexpr):
    """norm(h) at columns k (any shape) of the row at h_row, in float32 after rounding to h's
    dtype (the reference rounds norm's output before the projection); 0 past H."""
    km = k < H
    x = tl.load(h_row + k, mask=km, other=0.0).to(tl.float32)
    g = tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * g
    if HAS_NORM_BIAS:
        y += tl.load(nb_ptr + k, mask=km, other=0.0).to(tl.float32)
    return tl.where(km, y.to(h_row.dtype.element_ty).to(tl.float32), 0.0)


@triton.jit
def _add_up(h_row, out_row, ub_ptr, y, cols, mask, HAS_BIAS: tl.constexpr):
    """out = h + (y + up_bias, rounded) at columns cols: the up projection's epilogue."""
    dtype = out_row.dtype.element_ty
    if HAS_BIAS:
        y += tl.load(ub_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = y.to(dtype).to(tl.float32)                                   # the up projection, rounded
    x = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_row + cols, (x + y).to(dtype), mask=mask)


@triton.jit
def _skip_adapter_kernel(h_ptr, nw_ptr, nb_ptr, down_ptr, up_ptr, ub_ptr, row_mask_ptr, out_ptr,
                         H, RANK, eps, stride_hn, stride_on, stride_dr, stride_dk,
                         stride_uh, stride_ur,
                         RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                         FORMAT: tl.constexpr):   # "dense", or both weights' format ("q4_0", ...)
    row = tl.program_id(0).to(tl.int64)
    h_row = h_ptr + row * stride_hn
    out_row = out_ptr + row * stride_on
    dtype = out_ptr.dtype.element_ty
    hs = tl.arange(0, BLOCK_H)
    if tl.load(row_mask_ptr + row) != 0:
        one = tl.arange(0, 1)
        mean, rstd = row_stats(h_row + one[:, None], one == 0, H, eps, RMS, 1, BLOCK_K)
        if FORMAT == "dense":
            ranks = tl.arange(0, BLOCK_R)
            rm = ranks < RANK
            cols = tl.arange(0, BLOCK_K)
            z = tl.zeros([BLOCK_R], dtype=tl.float32)
            for start in range(0, H, BLOCK_K):
                km = start + cols < H
                y = _normed(h_row, nw_ptr, nb_ptr, mean, rstd, start + cols, H, HAS_NORM_BIAS)
                w = tl.load(down_ptr + ranks[:, None] * stride_dr
                            + (start + cols)[None, :] * stride_dk,
                            mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
                z += tl.sum(w * y[None, :], axis=1)
            z = z.to(dtype).to(tl.float32)                           # the down projection, rounded
            for start in range(0, H, BLOCK_H):
                hm = start + hs < H
                w = tl.load(up_ptr + (start + hs)[:, None] * stride_uh + ranks[None, :] * stride_ur,
                            mask=hm[:, None] & rm[None, :], other=0.0).to(tl.float32)
                _add_up(h_row, out_row, ub_ptr, tl.sum(w * z[None, :], axis=1), start + hs, hm,
                        HAS_BIAS)
        else:
            # Down: the rank rows as two sets [RB, 16, 1] (ranks 32 b + i and 32 b + 16 + i),
            # each against the hidden dim's blocks of 32 as two halves of 16 lanes, summed lane
            # by lane in [RB, 16, 16] and reduced once, after the loop.
            RB: tl.constexpr = BLOCK_R // 32
            i = tl.arange(0, 16)
            r_lo = (tl.arange(0, RB)[:, None] * 32 + i[None, :])[:, :, None]    # [RB, 16, 1]
            r_hi = r_lo + 16
            m_lo = r_lo < RANK
            m_hi = r_hi < RANK
            d_lo = down_ptr + r_lo * stride_dr
            d_hi = down_ptr + r_hi * stride_dr
            s_lo = row_scale(d_lo, m_lo, FORMAT)
            s_hi = row_scale(d_hi, m_hi, FORMAT)
            acc_lo = tl.zeros([RB, 16, 16], dtype=tl.float32)
            acc_hi = tl.zeros([RB, 16, 16], dtype=tl.float32)
            k3 = i[None, None, :]                                                # [1, 1, 16]
            for first in range(0, tl.cdiv(H, 32), BLOCK_K // 32):
                for u in tl.static_range(BLOCK_K // 32):
                    k = (first + u) * 32 + k3
                    y_lo = _normed(h_row, nw_ptr, nb_ptr, mean, rstd, k, H, HAS_NORM_BIAS)
                    y_hi = _normed(h_row, nw_ptr, nb_ptr, mean, rstd, k + 16, H, HAS_NORM_BIAS)
                    lo, hi = block_values(d_lo, m_lo, s_lo, first + u, H, FORMAT)
                    acc_lo += y_lo * lo + y_hi * hi
                    lo, hi = block_values(d_hi, m_hi, s_hi, first + u, H, FORMAT)
                    acc_hi += y_lo * lo + y_hi * hi
            # z's halves, rounded (the down projection), as [1, RB, 16] for the up projection
            z_lo = tl.sum(acc_lo, axis=2).to(dtype).to(tl.float32)[None, :, :]
            z_hi = tl.sum(acc_hi, axis=2).to(dtype).to(tl.float32)[None, :, :]
            # Up: a chunk of BLOCK_H up_weight rows [BLOCK_H, 1, 1], all RB blocks of each at once.
            blocks = tl.arange(0, RB)[None, :, None]                             # [1, RB, 1]
            for start in range(0, H, BLOCK_H):
                hm = start + hs < H
                u_rows = (up_ptr + (start + hs) * stride_uh)[:, None, None]
                um = hm[:, None, None]
                lo, hi = block_values(u_rows, um, row_scale(u_rows, um, FORMAT), blocks, RANK,
                                      FORMAT)
                y = tl.sum(tl.sum(lo * z_lo + hi * z_hi, axis=2), axis=1)
                _add_up(h_row, out_row, ub_ptr, y, start + hs, hm, HAS_BIAS)
    else:
        for start in range(0, H, BLOCK_H):
            hm = start + hs < H
            tl.store(out_row + start + hs, tl.load(h_row + start + hs, mask=hm), mask=hm)


def skip_adapter(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask, eps: float,
                 rms: bool):
    """See ops/reference.py:skip_adapter. h [N, hidden]; down_weight [rank, hidden]; up_weight
    [hidden, rank] (float tensors of h's dtype, or QuantizedWeights of one format); up_bias
    [hidden] or None; row_mask bool [N]."""
    check_skip_adapter_args(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask)
    (n, hidden), rank = h.shape, down_weight.shape[0]
    fmt = format_of(down_weight)
    if n > _KERNEL_ROWS:
        if fmt == "dense":
            return _unfused(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask,
                            eps, rms)
        return _dequantized(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask,
                            eps, rms)
    if h.stride(-1) != 1:
        h = h.contiguous()
    norm_weight = norm_weight.contiguous()
    norm_bias = None if norm_bias is None else norm_bias.contiguous()
    up_bias = None if up_bias is None else up_bias.contiguous()
    out = torch.empty((n, hidden), dtype=h.dtype, device=h.device)
    if n == 0:
        return out
    if fmt == "dense":
        down, up = down_weight, up_weight
        block_r = max(triton.next_power_of_2(rank), 2)
        block_k = block_h = max(16, min(triton.next_power_of_2(hidden), _TILE // block_r))
    else:                       # uint8 rows (contiguous each), at a stride; blocks of 32 ranks
        down, up = down_weight.data, up_weight.data
        block_r = max(triton.next_power_of_2(rank), 32)
        block_k = max(32, min(triton.next_power_of_2(hidden), _TILE // block_r))
        block_h = max(16, min(triton.next_power_of_2(hidden), _TILE // block_r))
    _skip_adapter_kernel[(n,)](
        h, norm_weight, norm_weight if norm_bias is None else norm_bias, down, up,
        h if up_bias is None else up_bias, row_mask.contiguous(), out, hidden, rank, float(eps),
        h.stride(0), out.stride(0), *down.stride(), *up.stride(),
        RMS=bool(rms), HAS_NORM_BIAS=norm_bias is not None, HAS_BIAS=up_bias is not None,
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_H=block_h, FORMAT=fmt, num_warps=4)
    return out


def _dequantized(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask, eps, rms):
    """The reference's skip_adapter for quantized weights past the kernel's rows: both weights
    dequantized to float32 (one launch each), the products in float32, each rounded to h's
    dtype."""
    z = F.linear(norm(h, norm_weight, norm_bias, eps, rms).float(), dequantize(down_weight))
    y = F.linear(z.to(h.dtype).float(), dequantize(up_weight),
                 None if up_bias is None else up_bias.float()).to(h.dtype)
    return torch.where(row_mask[:, None], h + y, h)
