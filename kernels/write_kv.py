"""write_kv: copy K/V rows [N, kv_heads, d] into one layer's paged cache at slot_mapping.

One program per row and per BLOCK of the row's kv_heads*d values. A row whose slot is -1 loads and
stores nothing (a scalar branch): the spare last slot is never touched.
Strided inputs and caches are fine (k/v are often views of a fused K|V projection).
"""
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, D, HD,
                     stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
                     stride_ks, stride_kch, stride_kcd, stride_vs, stride_vch, stride_vcd,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    if slot >= 0:
        mask = offs < HD
        head = offs // D
        d = offs % D
        k = tl.load(k_ptr + row * stride_kn + head * stride_kh + d * stride_kd, mask=mask)
        v = tl.load(v_ptr + row * stride_vn + head * stride_vh + d * stride_vd, mask=mask)
        tl.store(k_cache_ptr + slot * stride_ks + head * stride_kch + d * stride_kcd,
                 k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * stride_vs + head * stride_vch + d * stride_vcd,
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """k, v [N, kv_heads, d] -> k_cache, v_cache [slots + 1, kv_heads, d] at slot_mapping [N]."""
    n, kv_heads, d = k.shape
    if n == 0:
        return
    hd = kv_heads * d
    block = min(triton.next_power_of_2(hd), 1024)
    grid = (n, triton.cdiv(hd, block))
    _write_kv_kernel[grid](k, v, k_cache, v_cache, slot_mapping, d, hd,
                           *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
                           BLOCK=block, num_warps=4)
