"""norm: RMSNorm / LayerNorm over the last dim, fp32 math, output in the input dtype.

One program per row; the row is read in BLOCK_H chunks (two passes for RMS, three for LayerNorm:
mean, centred variance, output), so any hidden size works and the variance is computed the same
way as torch's (centred, not E[x^2] - E[x]^2). `row_stats` is that statistics pass for a tile of
rows; skip_kv's norm prologue uses it too, and add_norm uses `normalize_row`.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def row_stats(row_ptrs, active, H, eps, RMS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """(mean, rstd) [BLOCK_M] in fp32 of the rows row_ptrs [BLOCK_M, 1] (inactive rows read as
    zeros); LayerNorm's variance is centred, like torch's. Shared with skip_kv's prologue."""
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for start in range(0, H, BLOCK_K):
        xm = active[:, None] & (start + cols < H)[None, :]
        x = tl.load(row_ptrs + start + cols[None, :], mask=xm, other=0.0).to(tl.float32)
        if RMS:
            acc += x * x
        else:
            acc += x
    stat = tl.sum(acc, axis=1) / H
    if RMS:
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd = 1.0 / tl.sqrt(stat + eps)
    else:
        mean = stat
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for start in range(0, H, BLOCK_K):
            xm = active[:, None] & (start + cols < H)[None, :]
            x = tl.load(row_ptrs + start + cols[None, :], mask=xm, other=0.0).to(tl.float32)
            xc = tl.where(xm, x - mean[:, None], 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / H + eps)
    return mean, rstd


@triton.jit
def normalize_row(x_row, out_row, w_ptr, b_ptr, H, eps, RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """out_row = norm(x_row) for one row of H: the statistics, then the pass that normalises,
    scales, shifts and stores in the output dtype. Shared with add_norm."""
    cols = tl.arange(0, BLOCK_H)
    one = tl.arange(0, 1)
    mean, rstd = row_stats(x_row + one[:, None], one == 0, H, eps, RMS, 1, BLOCK_H)
    for start in range(0, H, BLOCK_H):
        m = start + cols < H
        x = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * tl.load(w_ptr + start + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + start + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_row + start + cols, y.to(out_row.dtype.element_ty), mask=m)


@triton.jit
def _norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, H, stride_x, stride_out, eps,
                 RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    normalize_row(x_ptr + row * stride_x, out_ptr + row * stride_out, w_ptr, b_ptr, H, eps, RMS,
                  HAS_BIAS, BLOCK_H)


def norm(x, weight, bias, eps: float, rms: bool):
    """RMSNorm (rms=True) or LayerNorm of x [..., H]; returns a new tensor of x's dtype."""
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], H), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        block = min(triton.next_power_of_2(H), 4096)
        _norm_kernel[(x2.shape[0],)](
            x2, weight, weight if bias is None else bias, out, H, x2.stride(0), out.stride(0),
            float(eps), RMS=bool(rms), HAS_BIAS=bias is not None, BLOCK_H=block,
            num_warps=4 if block <= 1024 else 8)
    return out.view(x.shape)
