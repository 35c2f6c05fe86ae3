"""linear: activation(x @ weight^T + bias) (+ residual), rows masked by row_mask, see
ops/reference.py:linear.

A decode step's MLP projections are GEMVs (a few rows of x against a whole weight matrix) with
an epilogue: the activation after the first, the residual add after the second, and (in the
masked layer loop) the row mask after the out and down projections. Up to _GEMV_ROWS rows with an
epilogue, _gemv_kernel does product and epilogue in one launch, where
cuBLAS + the epilogue's ops take two; a decode step on a GPU is bound by its launches. Grid:
output columns in tiles of BLOCK_N (for gated SiLU, each program also takes the matching up
rows); a program walks the hidden dim in BLOCK_K chunks with a broadcast multiply-sum in fp32
(one query row per x row: no tl.dot). Every epilogue step rounds to the dtype as separate ops
would. A float weight's other cases (no epilogue, or more rows) are the reference's: cuBLAS,
then torch ops.

A quantized weight (ops/weight_formats.py) makes even a plain GEMV worth a kernel of our own:
bound by weight bytes, it reads 1.06 (q8_0) or 0.56 (q4_0) bytes a weight, where the reference
writes a float32 copy (4 bytes) and reads it back. Up to _GEMV_ROWS rows, epilogue or not,
_gemv_kernel dequantizes each block of 32 values in registers (kernels/weight_formats.py) and
accumulates in fp32, as the reference's float32 product. More rows make it a GEMM, bound by
arithmetic: the weight is dequantized to float32 (one Triton launch, in slabs of at most
_DEQUANT_VALUES values so an LM head never needs its whole float32 copy at once), multiplied
by cuBLAS in float32, then the reference's epilogue.
"""
import torch
import triton
import triton.language as tl

from anee_fast.ops.reference import ACTIVATIONS, check_row_mask
from anee_fast.ops.reference import linear as _unfused
from anee_fast.ops.weight_formats import format_of

from .weight_formats import block_values, dequantize, row_scale

_GEMV_ROWS = 8
_DEQUANT_VALUES = 1 << 26        # float32 weight values dequantized at once past the GEMV rows


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, row_mask_ptr, out_ptr, M, K, N_OUT,
                 stride_xm, stride_wn, stride_rm, stride_om,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,   # ACT:
                 # the activation's index in ACTIVATIONS (0 none, 1 gelu_tanh, 2 silu_gated)
                 HAS_ROW_MASK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FORMAT: tl.constexpr):   # "dense", or the uint8 rows' format ("int8", "q4_0", ...)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N_OUT
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)     # gated: the up rows' product
    if FORMAT == "dense":
        ks = tl.arange(0, BLOCK_K)
        for start in range(0, K, BLOCK_K):
            km = start + ks < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + start + ks[None, :],
                        mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + start + ks[None, :],
                        mask=cm[:, None] & km[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
            if ACT == 2:
                wu = tl.load(w_ptr + (cols + N_OUT)[:, None] * stride_wn + start + ks[None, :],
                             mask=cm[:, None] & km[None, :], other=0.0).to(tl.float32)
                acc_up += tl.sum(x[:, None, :] * wu[None, :, :], axis=2)
    else:    # BLOCK_K // 32 blocks of 32 values a step, each dequantized as two halves of 16
        i = tl.arange(0, 16)
        wm = cm[None, :, None]                                  # weight rows as [1, BLOCK_N, 1]
        wrow = (w_ptr + cols * stride_wn)[None, :, None]
        scale = row_scale(wrow, wm, FORMAT)
        wrow_up = (w_ptr + (cols + N_OUT) * stride_wn)[None, :, None]
        scale_up = scale
        if ACT == 2:
            scale_up = row_scale(wrow_up, wm, FORMAT)
        x_rows = (x_ptr + rows * stride_xm)[:, None, None]        # x rows as [BLOCK_M, 1, 1]
        xm = rm[:, None, None]
        # Products [BLOCK_M, BLOCK_N, 16] of x and weight tiles both born in its layout (no
        # conversion), summed over the blocks lane by lane and reduced once, after the loop.
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, 16], dtype=tl.float32)
        acc3_up = tl.zeros([BLOCK_M, BLOCK_N, 16], dtype=tl.float32)
        for first in range(0, tl.cdiv(K, 32), BLOCK_K // 32):
            for u in tl.static_range(BLOCK_K // 32):
                k = (first + u) * 32 + i
                x_lo = tl.load(x_rows + k, mask=xm & (k < K), other=0.0).to(tl.float32)
                x_hi = tl.load(x_rows + 16 + k, mask=xm & (k + 16 < K), other=0.0).to(tl.float32)
                lo, hi = block_values(wrow, wm, scale, first + u, K, FORMAT)
                acc3 += x_lo * lo + x_hi * hi
                if ACT == 2:
                    lo, hi = block_values(wrow_up, wm, scale_up, first + u, K, FORMAT)
                    acc3_up += x_lo * lo + x_hi * hi
        acc = tl.sum(acc3, axis=2)
        acc_up = tl.sum(acc3_up, axis=2)
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype).to(tl.float32)                            # the product, rounded
    if ACT == 1:     # GELU, tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = (0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))).to(dtype).to(tl.float32)
    if ACT == 2:     # silu(gate) * up, each rounded
        if HAS_BIAS:
            acc_up += tl.load(b_ptr + cols + N_OUT, mask=cm, other=0.0).to(tl.float32)[None, :]
        up = acc_up.to(dtype).to(tl.float32)
        gate = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32)
        y = (gate * up).to(dtype).to(tl.float32)
    if HAS_ROW_MASK:     # a select, not a product: a masked row's NaN stays out
        keep = tl.load(row_mask_ptr + rows, mask=rm, other=0) != 0
        y = tl.where(keep[:, None], y, 0.0)
    mask = rm[:, None] & cm[None, :]
    if HAS_RESIDUAL:
        y += tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(dtype), mask=mask)


def linear(x, weight, bias=None, activation: str = "none", residual=None, row_mask=None):
    """See ops/reference.py:linear. x [..., K], weight [N, K] (a float tensor or a
    QuantizedWeight) -> [..., N] (N / 2 when gated)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_row_mask(row_mask, x)
    fmt = format_of(weight)
    rows = x.numel() // max(x.shape[-1], 1)
    epilogue = activation != "none" or residual is not None or row_mask is not None
    if rows == 0 or (fmt == "dense" and (rows > _GEMV_ROWS or not epilogue)):
        return _unfused(x, weight, bias, activation, residual, row_mask)
    N, K = weight.shape
    n_out = _check_args(x, N, K, bias, activation, residual)
    if rows > _GEMV_ROWS:
        return _dequantized_gemm(x, weight, bias, activation, residual, row_mask, n_out)
    out_shape = (*x.shape[:-1], n_out)
    x2 = x.reshape(rows, K).contiguous()
    if fmt == "dense":
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
    else:
        w = weight.data                     # uint8 rows (contiguous each), at a stride
    bias = None if bias is None else bias.contiguous()
    r2 = None if residual is None else residual.reshape(rows, n_out).contiguous()
    m2 = None if row_mask is None else row_mask.reshape(rows).contiguous()
    out = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    block_m = triton.next_power_of_2(rows)
    block_n = 16
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x2, w, w if bias is None else bias, out if r2 is None else r2, out if m2 is None else m2,
        out, rows, K, n_out, x2.stride(0), w.stride(0), 0 if r2 is None else r2.stride(0),
        out.stride(0), ACT=ACTIVATIONS.index(activation), HAS_BIAS=bias is not None,
        HAS_RESIDUAL=r2 is not None, HAS_ROW_MASK=m2 is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=max(32, 256 // block_m), FORMAT=fmt,
        num_warps=4)
    return out.view(out_shape)


def _check_args(x, N, K, bias, activation, residual) -> int:
    """The output width, after checking what the kernels would otherwise read past or broadcast."""
    if x.shape[-1] != K:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight expects {K}")
    if activation == "silu_gated" and N % 2:
        raise ValueError(f"linear: silu_gated needs an even number of weight rows, got {N}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"linear: bias must be [{N}], got {list(bias.shape)}")
    n_out = N // 2 if activation == "silu_gated" else N
    out_shape = (*x.shape[:-1], n_out)
    if residual is not None and (tuple(residual.shape) != out_shape or residual.dtype != x.dtype):
        raise ValueError(f"linear: residual must be {list(out_shape)} in {x.dtype}, got "
                         f"{list(residual.shape)} {residual.dtype}")
    return n_out


def _dequantized_gemm(x, weight, bias, activation, residual, row_mask, n_out):
    """The reference's linear on the float32 weight, past the GEMV rows: slabs of output columns
    (gated: a slab's gate rows and their up rows), each dequantized by one launch."""
    K = weight.shape[1]
    parts = 2 if activation == "silu_gated" else 1
    step = max(1, _DEQUANT_VALUES // max(parts * K, 1))
    if step >= n_out:
        return _unfused(x, dequantize(weight), bias, activation, residual, row_mask)
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    slab = torch.empty((parts * step, K), dtype=torch.float32, device=x.device)
    for a in range(0, n_out, step):
        n = min(step, n_out - a)
        starts = [a + p * n_out for p in range(parts)]          # gate rows, then up rows
        for p, s in enumerate(starts):
            dequantize(weight[s:s + n], out=slab[p * n:(p + 1) * n])
        b = None if bias is None else torch.cat([bias[s:s + n] for s in starts])
        r = None if residual is None else residual[..., a:a + n]
        out[..., a:a + n] = _unfused(x, slab[:parts * n], b, activation, r, row_mask)
    return out
