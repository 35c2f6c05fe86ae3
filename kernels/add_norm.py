"""add_norm: s = x + residual (stored in x's dtype), then RMSNorm / LayerNorm of s in fp32.

The residual add and the norm that reads it, in one launch: one program per row writes s, waits
for the whole row (a barrier), then runs norm's passes over the s it wrote, so the statistics
see exactly the rounded values the unfused add + norm would.
"""
import torch
import triton
import triton.language as tl

from .norm import normalize_row


@triton.jit
def _add_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, H, eps,
                     RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    for start in range(0, H, BLOCK_H):
        m = start + cols < H
        x = tl.load(x_ptr + row * H + start + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * H + start + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row * H + start + cols, (x + r).to(sum_ptr.dtype.element_ty), mask=m)
    tl.debug_barrier()
    normalize_row(sum_ptr + row * H, out_ptr + row * H, w_ptr, b_ptr, H, eps, RMS, HAS_BIAS, BLOCK_H)


def add_norm(x, residual, weight, bias, eps: float, rms: bool):
    """(x + residual, norm of it) for x, residual [..., H] of one shape and dtype."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_norm: x {tuple(x.shape)} {x.dtype} and residual "
                         f"{tuple(residual.shape)} {residual.dtype} must match")
    H = x.shape[-1]
    x2, r2 = x.reshape(-1, H).contiguous(), residual.reshape(-1, H).contiguous()
    total, out = torch.empty_like(x2), torch.empty_like(x2)
    if x2.shape[0] > 0:
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        block = min(triton.next_power_of_2(H), 4096)
        _add_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, weight if bias is None else bias, total, out, H, float(eps),
            RMS=bool(rms), HAS_BIAS=bias is not None, BLOCK_H=block,
            num_warps=4 if block <= 1024 else 8)
    return total.view(x.shape), out.view(x.shape)
