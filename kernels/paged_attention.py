"""paged_attention: causal attention of each query row over its sequence's paged K/V cache.

Grid: (rows, query heads, splits). A program walks its share of the pages its row may see (from
the first page inside the sliding window to the page holding the row's own position), one page
per iteration, with an online softmax (running max / sum) in fp32. GQA maps query head hq to
KV head hq // (Hq / KVH). No tl.dot: a row has one query, so the dot products are
broadcast-multiply-sum over the head dim (which also keeps fp32 exact in the interpreter).
Prefill rows (many per sequence) and decode rows are the same thing to this kernel.

Flash-decoding: when rows x heads is too few programs to fill a GPU (decode at small batch),
each row's pages are cut into `splits` contiguous chunks; each chunk stores its unnormalised
(max, sum, acc), and the last program of a (row, head) to arrive (an atomic counter) merges them
in the same launch: no second kernel. The counters are zero between launches (the merging
program resets its own), one buffer per stream. The split count comes from shapes only (never
from device values), so the launcher never syncs with the device.
"""
import torch
import triton
import triton.language as tl

_TARGET_PROGRAMS = 512      # about 4 programs per SM on an H100: enough to hide latency
_MAX_SPLITS = 16
_MIN_PAGES_PER_SPLIT = 4


@triton.jit
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, seq_ptr, pos_ptr, out_ptr,
                            m_ptr, l_ptr, acc_ptr, arrivals_ptr,
                            D, GROUP, block_size, scale, sliding_window, NUM_SPLITS,
                            stride_qn, stride_qh, stride_qd, stride_ks, stride_kh, stride_kd,
                            stride_vs, stride_vh, stride_vd, stride_tb, stride_on, stride_oh,
                            SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = head // GROUP
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + row * stride_qn + head * stride_qh + d * stride_qd, mask=dm,
                other=0.0).to(tl.float32) * scale
    seq = tl.load(seq_ptr + row)
    pos = tl.load(pos_ptr + row)
    first = tl.where(sliding_window > 0, tl.maximum(pos - sliding_window + 1, 0), 0)
    table = table_ptr + seq * stride_tb
    # This program's pages: split `split` of the row's pages first_page..last_page (none for a
    # row with a negative position: it sees no key and gets zeros, as in the reference).
    first_page = first // block_size
    last_page = tl.where(pos >= 0, pos // block_size, first_page - 1)
    per_split = (last_page - first_page + NUM_SPLITS) // NUM_SPLITS
    lo = first_page + split * per_split
    hi = tl.minimum(lo + per_split, last_page + 1)
    offs = tl.arange(0, BLOCK_N)
    m_i = tl.zeros([], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Every visited page holds at least one visible key, so m_i is finite after the first one.
    for b in range(lo, hi):
        page = tl.load(table + b).to(tl.int64)
        key_pos = b * block_size + offs
        km = (offs < block_size) & (key_pos <= pos) & (key_pos >= first)
        slots = page * block_size + offs
        kv_mask = km[:, None] & dm[None, :]
        k = tl.load(k_cache_ptr + slots[:, None] * stride_ks + kv_head * stride_kh
                    + d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(km, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_cache_ptr + slots[:, None] * stride_vs + kv_head * stride_vh
                    + d[None, :] * stride_vd, mask=kv_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out_row = out_ptr + row * stride_on + head * stride_oh + d
    if SPLIT:
        # Partial results [rows, heads, splits(, D)]; an empty split leaves m=-inf, l=0, acc=0.
        row_head = row * tl.num_programs(1) + head
        part = row_head * NUM_SPLITS + split
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part * BLOCK_D + d, acc)
        tl.debug_barrier()               # every thread's stores before the arrival (release)
        arrived = tl.atomic_add(arrivals_ptr + row_head, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            # The last split: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s
            # m_s; empty splits weigh 0 (all of them for a row without keys: zeros). Loads from
            # L2, past this SM's L1.
            s = tl.arange(0, BLOCK_S)
            sm = s < NUM_SPLITS
            base = row_head * NUM_SPLITS
            m = tl.load(m_ptr + base + s, mask=sm, other=float("-inf"), cache_modifier=".cg")
            l = tl.load(l_ptr + base + s, mask=sm, other=0.0, cache_modifier=".cg")
            parts = tl.load(acc_ptr + (base + s)[:, None] * BLOCK_D + d[None, :], mask=sm[:, None],
                            other=0.0, cache_modifier=".cg")
            top = tl.max(m, axis=0)
            w = tl.exp(m - tl.where(top > float("-inf"), top, 0.0))      # exp(-inf) = 0
            denom = tl.sum(w * l, axis=0)
            merged = tl.sum(w[:, None] * parts, axis=0) / tl.where(denom > 0, denom, 1.0)
            tl.store(out_row, merged.to(out_ptr.dtype.element_ty), mask=dm)
            tl.store(arrivals_ptr + row_head, 0)      # ready for the next launch on this stream
    else:
        tl.store(out_row, (acc / tl.where(l_i > 0, l_i, 1.0)).to(out_ptr.dtype.element_ty), mask=dm)


_ARRIVALS = {}      # (device, stream) -> int32 [_TARGET_PROGRAMS]: the split programs' counters


def _arrival_counters(device):
    """The arrival counters of split launches on the current stream, zero between launches
    (launches on one stream run in order; a split launch has fewer than _TARGET_PROGRAMS rows x
    heads). Made on the stream's first call outside a capture, split or not (so the warm-up
    before a capture makes it), and never freed (a CUDA graph holds the address). Inside a
    capture, a stream without one gets None: zeros made there would be set only by the graph's
    own replays."""
    cuda = device.type == "cuda"
    key = (str(device), torch.cuda.current_stream(device).cuda_stream if cuda else 0)
    if key not in _ARRIVALS:
        if cuda and torch.cuda.is_current_stream_capturing():
            return None
        _ARRIVALS[key] = torch.zeros(_TARGET_PROGRAMS, dtype=torch.int32, device=device)
    return _ARRIVALS[key]


def _num_splits(rows: int, heads: int, max_pages: int) -> int:
    """Splits per (row, head): enough programs to fill the GPU, >= 4 pages per split."""
    by_programs = triton.cdiv(_TARGET_PROGRAMS, max(rows * heads, 1))
    by_pages = max(max_pages // _MIN_PAGES_PER_SPLIT, 1)
    return max(1, min(by_programs, by_pages, _MAX_SPLITS))


def _paged_attention(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size, scale,
                     sliding_window, num_splits):
    n, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    assert heads % kv_heads == 0, "query heads must be a multiple of KV heads"
    out = torch.empty((n, heads, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    block_d = triton.next_power_of_2(d)
    split = num_splits > 1
    arrivals = _arrival_counters(q.device)
    if split:
        m = torch.empty((n, heads, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((n, heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        if arrivals is None:           # a capture's first call on its stream: counters of its own
            arrivals = torch.zeros(n * heads, dtype=torch.int32, device=q.device)
    else:
        m = l = acc = arrivals = out           # unused
    _paged_attention_kernel[(n, heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_idx, positions, out, m, l, acc, arrivals,
        d, heads // kv_heads, int(block_size), float(scale), int(sliding_window or 0), num_splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        out.stride(0), out.stride(1),
        SPLIT=split, BLOCK_N=triton.next_power_of_2(int(block_size)), BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out


def paged_attention(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size: int,
                    scale: float, sliding_window: int = 0):
    """See ops/reference.py:paged_attention. q [N, heads, d] -> out [N, heads, d] (q's dtype)."""
    splits = _num_splits(q.shape[0], q.shape[1], block_tables.shape[1])
    return _paged_attention(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size,
                            scale, sliding_window, splits)
