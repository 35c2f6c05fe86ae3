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
"""
import torch
import triton
import triton.language as tl

from anee_fast.ops.reference import check_skip_adapter_args
from anee_fast.ops.reference import skip_adapter as _unfused

from .norm import row_stats

_KERNEL_ROWS = 8
_TILE = 4096        # weight elements per loaded tile: BLOCK_R x BLOCK_K (or BLOCK_H)


@triton.jit
def _skip_adapter_kernel(h_ptr, nw_ptr, nb_ptr, down_ptr, up_ptr, ub_ptr, row_mask_ptr, out_ptr,
                         H, RANK, eps, stride_hn, stride_on, stride_dr, stride_dk,
                         stride_uh, stride_ur,
                         RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h_row = h_ptr + row * stride_hn
    out_row = out_ptr + row * stride_on
    dtype = out_ptr.dtype.element_ty
    hs = tl.arange(0, BLOCK_H)
    if tl.load(row_mask_ptr + row) != 0:
        one = tl.arange(0, 1)
        mean, rstd = row_stats(h_row + one[:, None], one == 0, H, eps, RMS, 1, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        rm = ranks < RANK
        cols = tl.arange(0, BLOCK_K)
        z = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, H, BLOCK_K):
            km = start + cols < H
            x = tl.load(h_row + start + cols, mask=km, other=0.0).to(tl.float32)
            g = tl.load(nw_ptr + start + cols, mask=km, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * g
            if HAS_NORM_BIAS:
                y += tl.load(nb_ptr + start + cols, mask=km, other=0.0).to(tl.float32)
            y = tl.where(km, y.to(dtype).to(tl.float32), 0.0)     # norm's output, rounded
            w = tl.load(down_ptr + ranks[:, None] * stride_dr + (start + cols)[None, :] * stride_dk,
                        mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
            z += tl.sum(w * y[None, :], axis=1)
        z = z.to(dtype).to(tl.float32)                               # the down projection, rounded
        for start in range(0, H, BLOCK_H):
            hm = start + hs < H
            w = tl.load(up_ptr + (start + hs)[:, None] * stride_uh + ranks[None, :] * stride_ur,
                        mask=hm[:, None] & rm[None, :], other=0.0).to(tl.float32)
            y = tl.sum(w * z[None, :], axis=1)
            if HAS_BIAS:
                y += tl.load(ub_ptr + start + hs, mask=hm, other=0.0).to(tl.float32)
            y = y.to(dtype).to(tl.float32)                           # the up projection, rounded
            x = tl.load(h_row + start + hs, mask=hm, other=0.0).to(tl.float32)
            tl.store(out_row + start + hs, (x + y).to(dtype), mask=hm)
    else:
        for start in range(0, H, BLOCK_H):
            hm = start + hs < H
            tl.store(out_row + start + hs, tl.load(h_row + start + hs, mask=hm), mask=hm)


def skip_adapter(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask, eps: float,
                 rms: bool):
    """See ops/reference.py:skip_adapter. h [N, hidden]; down_weight [rank, hidden]; up_weight
    [hidden, rank]; up_bias [hidden] or None; row_mask bool [N]."""
    check_skip_adapter_args(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask)
    (n, hidden), rank = h.shape, down_weight.shape[0]
    if n > _KERNEL_ROWS:
        return _unfused(h, norm_weight, norm_bias, down_weight, up_weight, up_bias, row_mask, eps,
                        rms)
    if h.stride(-1) != 1:
        h = h.contiguous()
    norm_weight = norm_weight.contiguous()
    norm_bias = None if norm_bias is None else norm_bias.contiguous()
    up_bias = None if up_bias is None else up_bias.contiguous()
    out = torch.empty((n, hidden), dtype=h.dtype, device=h.device)
    if n == 0:
        return out
    block_r = max(triton.next_power_of_2(rank), 2)
    block = max(16, min(triton.next_power_of_2(hidden), _TILE // block_r))
    _skip_adapter_kernel[(n,)](
        h, norm_weight, norm_weight if norm_bias is None else norm_bias, down_weight, up_weight,
        h if up_bias is None else up_bias, row_mask.contiguous(), out, hidden, rank, float(eps),
        h.stride(0), out.stride(0), *down_weight.stride(), *up_weight.stride(),
        RMS=bool(rms), HAS_NORM_BIAS=norm_bias is not None, HAS_BIAS=up_bias is not None,
        BLOCK_R=block_r, BLOCK_K=block, BLOCK_H=block, num_warps=4)
    return out
