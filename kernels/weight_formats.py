"""Quantized weights (anee_fast/ops/weight_formats.py) in the Triton kernels: device code that
turns a stored row's values into float32, shared by linear and skip_kv, and a dequantize kernel.

A decode step's GEMVs read every weight byte once, so they dequantize in registers: a program
holds a few output rows' uint8 pointers and walks K one block of 32 values at a time
(`block_values`), multiplying by x in float32 as it goes; no float copy of the weight is ever
written. The int8 format has no blocks, only a per-row scale (`row_scale`, loaded once per row),
so it is walked in the same blocks of 32, the last one masked at K.

Each block comes back as two [..., rows, 16] tiles, values 32b + i and 32b + 16 + i
(i = 0..15): the 4-bit formats store exactly these two in one byte (low and high nibble), so
each byte is loaded once and no interleaving shuffle is needed; the caller loads x's two halves
to match. The caller also picks the tiles' rank through its pointers' shape: a GEMV passes its
weight rows as [1, rows, 1] and x as [x rows, 1, 16], so both are born in the layout of their
product [x rows, rows, 16] (2-D tiles broadcast into it would cost a layout conversion, a trip
through shared memory, per block), and accumulates that product lane by lane, reducing once
after the loop. Scales are assembled from single bytes and bitcast: GGUF blocks are 34/18/20
bytes and an int8 row is 4 + K, so a scale is at best 2-byte aligned (int8's float32 not even
that). Every value is computed as weight_formats.dequantize defines it, in float32.

Past the decode rows the product is a GEMM, bound by arithmetic rather than by weight bytes:
there `dequantize` (one launch, where torch's takes several) writes the float32
weight and the GEMM runs on it.
"""
import torch
import triton
import triton.language as tl

from anee_fast.ops.weight_formats import QuantizedWeight

BLOCK = 32          # values per step of a quantized row (a GGUF block; int8 is walked alike)


@triton.jit
def _i8_at(ptr, mask):
    """float32 of the int8s at byte pointers `ptr` (0 where masked)."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)


@triton.jit
def _f16_at(ptr, mask):
    """float32 of the little-endian float16 at byte pointers `ptr` (any alignment)."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f32_at(ptr, mask):
    """The little-endian float32 at byte pointers `ptr` (any alignment)."""
    b0 = tl.load(ptr, mask=mask, other=0).to(tl.uint32)
    b1 = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint32)
    b2 = tl.load(ptr + 2, mask=mask, other=0).to(tl.uint32)
    b3 = tl.load(ptr + 3, mask=mask, other=0).to(tl.uint32)
    return (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)


@triton.jit
def row_scale(row, row_mask, FORMAT: tl.constexpr):
    """What block_values needs once per row: int8's float32 scale (the row's first 4 bytes);
    unused by the block formats (their scales are per block). row: uint8 pointers [..., R, 1]."""
    if FORMAT == "int8":
        scale = _f32_at(row, row_mask)
    else:
        scale = tl.where(row_mask, 1.0, 0.0)
    return scale


@triton.jit
def block_values(row, row_mask, scale, blk, K, FORMAT: tl.constexpr):
    """(lo, hi): float32 [..., R, 16], values 32 blk + i and 32 blk + 16 + i (i = 0..15) of the
    weight rows at uint8 pointers `row` [..., R, 1] (row_mask and scale = row_scale alike) in
    FORMAT ("int8", "q8_0", "q4_0", "q4_1"); zero for masked rows and past K."""
    i = tl.arange(0, 16)
    k = blk * 32 + i
    m_lo = row_mask & (k < K)
    m_hi = row_mask & (k + 16 < K)
    if FORMAT == "int8":         # 4 scale bytes, then K int8
        lo = scale * _i8_at(row + 4 + k, m_lo)
        hi = scale * _i8_at(row + 20 + k, m_hi)
    else:
        # (not row_mask & ...: the interpreter's & of a bool tensor and a scalar gives ints)
        bm = tl.where(blk * 32 < K, row_mask, False)
        if FORMAT == "q8_0":     # blocks of 34 bytes: float16 d, 32 int8
            base = row + blk * 34
            d = _f16_at(base, bm)
            lo = d * _i8_at(base + 2 + i, m_lo)
            hi = d * _i8_at(base + 18 + i, m_hi)
        elif FORMAT == "q4_0":   # blocks of 18 bytes: float16 d, 16 bytes of two 4-bit values
            base = row + blk * 18
            d = _f16_at(base, bm)
            qs = tl.load(base + 2 + i, mask=m_lo, other=0)
            lo = ((qs & 0xF).to(tl.float32) - 8.0) * d
            hi = ((qs >> 4).to(tl.float32) - 8.0) * d
        else:
            tl.static_assert(FORMAT == "q4_1", "FORMAT: int8, q8_0, q4_0 or q4_1")
            base = row + blk * 20   # blocks of 20 bytes: float16 d, float16 m, 16 bytes
            d = _f16_at(base, bm)
            m = _f16_at(base + 2, bm)
            qs = tl.load(base + 4 + i, mask=m_lo, other=0)
            lo = tl.where(m_lo, d * (qs & 0xF).to(tl.float32) + m, 0.0)
            hi = tl.where(m_hi, d * (qs >> 4).to(tl.float32) + m, 0.0)
    return lo, hi


@triton.jit
def _dequantize_kernel(w_ptr, values_ptr, N, K, stride_wn, stride_vn, FORMAT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    """BLOCK_N rows x BLOCKS blocks of 32 values of the weight into float32 values [N, K]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    row = (w_ptr + rows * stride_wn)[:, None]
    scale = row_scale(row, rm[:, None], FORMAT)
    i = tl.arange(0, 16)
    for u in tl.static_range(BLOCKS):
        blk = tl.program_id(1) * BLOCKS + u
        lo, hi = block_values(row, rm[:, None], scale, blk, K, FORMAT)
        k = blk * 32 + i
        dst = values_ptr + rows[:, None] * stride_vn + k[None, :]
        tl.store(dst, lo, mask=rm[:, None] & (k < K)[None, :])
        tl.store(dst + 16, hi, mask=rm[:, None] & (k + 16 < K)[None, :])


def dequantize(weight: QuantizedWeight, out=None) -> torch.Tensor:
    """float32 [N, K]: anee_fast.ops.weight_formats.dequantize in one launch (into `out`, a
    float32 [N, K] tensor with contiguous rows, when given)."""
    N, K = weight.shape
    data = weight.data
    if out is None:
        out = torch.empty((N, K), dtype=torch.float32, device=data.device)
    assert out.dtype == torch.float32 and out.shape == (N, K) and out.stride(1) == 1
    if N == 0 or K == 0:
        return out
    block_n, blocks = 16, 4
    grid = (triton.cdiv(N, block_n), triton.cdiv(triton.cdiv(K, BLOCK), blocks))
    _dequantize_kernel[grid](data, out, N, K, data.stride(0), out.stride(0),
                             FORMAT=weight.format, BLOCK_N=block_n, BLOCKS=blocks, num_warps=4)
    return out

