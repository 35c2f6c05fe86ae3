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
would. Everything else (no epilogue, or more rows) is the reference's: cuBLAS, then torch ops.
"""
import torch
import triton
import triton.language as tl

from anee_fast.ops.reference import ACTIVATIONS, check_row_mask
from anee_fast.ops.reference import linear as _unfused

_GEMV_ROWS = 8


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, row_mask_ptr, out_ptr, M, K, N_OUT,
                 stride_xm, stride_wn, stride_rm, stride_om,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,   # ACT:
                 # the activation's index in ACTIVATIONS (0 none, 1 gelu_tanh, 2 silu_gated)
                 HAS_ROW_MASK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N_OUT
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)     # gated: the up rows' product
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
    """See ops/reference.py:linear. x [..., K], weight [N, K] -> [..., N] (N / 2 when gated)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_row_mask(row_mask, x)
    rows = x.numel() // max(x.shape[-1], 1)
    epilogue = activation != "none" or residual is not None or row_mask is not None
    if not epilogue or rows > _GEMV_ROWS or rows == 0:
        return _unfused(x, weight, bias, activation, residual, row_mask)
    N, K = weight.shape
    if activation == "silu_gated" and N % 2:
        raise ValueError(f"linear: silu_gated needs an even number of weight rows, got {N}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"linear: bias must be [{N}], got {list(bias.shape)}")
    n_out = N // 2 if activation == "silu_gated" else N
    out_shape = (*x.shape[:-1], n_out)
    if residual is not None and (tuple(residual.shape) != out_shape or residual.dtype != x.dtype):
        raise ValueError(f"linear: residual must be {list(out_shape)} in {x.dtype}, got "
                         f"{list(residual.shape)} {residual.dtype}")
    x2 = x.reshape(rows, K).contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
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
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=max(32, 256 // block_m), num_warps=4)
    return out.view(out_shape)
