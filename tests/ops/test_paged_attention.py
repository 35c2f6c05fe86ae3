"""paged_attention of every compiled backend against the reference (see op_cases)."""
import os
import subprocess
import sys

import pytest
import torch

from anee_fast.ops import reference as ref
from op_cases import Target, target  # noqa: F401  (fixture)


def paged_layout(lengths, block_size, gen):
    """Block tables over a shuffled pool (padding entries point at block 0), and the slots."""
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    pool = torch.randperm(sum(blocks_per_seq) + 3, generator=gen)
    width = max(blocks_per_seq) + 1
    tables = torch.zeros(len(lengths), width, dtype=torch.long)
    used = 0
    for s, nb in enumerate(blocks_per_seq):
        tables[s, :nb] = pool[used:used + nb]
        used += nb
    return tables, int(pool.numel())


@pytest.mark.parametrize("lengths", [[1], [7, 37], [5, 1, 20]])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 64), (4, 4, 80)])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention(target, lengths, block_size, heads, kv_heads, head_dim, window):
    g = torch.Generator().manual_seed(sum(lengths) * block_size + head_dim + window)
    tables, num_blocks = paged_layout(lengths, block_size, g)
    slots = num_blocks * block_size
    k_cache = torch.randn(slots + 1, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(slots + 1, kv_heads, head_dim, generator=g)
    # Every position of every sequence asks (prefill); a decode step is the one-row case.
    seq_idx = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    q = torch.randn(len(positions), heads, head_dim, generator=g)
    scale = head_dim ** -0.5
    meta = [target.to(t) for t in (tables, seq_idx, positions)]
    got = target.ops.paged_attention(target.to(q), target.to(k_cache), target.to(v_cache), *meta,
                                     block_size, scale, window)
    expect = ref.paged_attention(target.exact(q), target.exact(k_cache), target.exact(v_cache), *meta,
                                 block_size, scale, window)
    torch.testing.assert_close(got.float(), expect, **target.tol)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 64), (4, 4, 80), (3, 1, 20), (2, 2, 256)])
@pytest.mark.parametrize("window", [0, 200])
def test_paged_attention_long_contexts(target, heads, kv_heads, head_dim, window):
    """Decode rows of few sequences with long contexts (1, 300 and 2100 keys): the case where a
    backend cuts each row's keys into splits and merges them (flash-decoding), the row of one key
    leaving most of its splits empty, the longest one's splits longer than a 128-key tile. Head
    dims from 20 (not a multiple of 16 bytes) to 256. A second call on the same stream, with other queries, is
    right too (whatever a split launch keeps between calls is left as it found it)."""
    g = torch.Generator().manual_seed(head_dim + window)
    block_size, lengths = 16, [1, 300, 2100]
    tables, num_blocks = paged_layout(lengths, block_size, g)
    slots = num_blocks * block_size
    k_cache = torch.randn(slots + 1, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(slots + 1, kv_heads, head_dim, generator=g)
    seq_idx = torch.arange(len(lengths))
    positions = torch.tensor(lengths) - 1
    q = torch.randn(len(lengths), heads, head_dim, generator=g) * 3     # peaked softmaxes too
    scale = head_dim ** -0.5
    meta = [target.to(t) for t in (tables, seq_idx, positions)]
    for queries in (q, -0.5 * q.flip(0)):
        got = target.ops.paged_attention(target.to(queries), target.to(k_cache), target.to(v_cache),
                                         *meta, block_size, scale, window)
        expect = ref.paged_attention(target.exact(queries), target.exact(k_cache),
                                     target.exact(v_cache), *meta, block_size, scale, window)
        torch.testing.assert_close(got.float(), expect, **target.tol)


@pytest.mark.parametrize("table_pages", [1, 64])        # 64: split launches where a backend splits
def test_paged_attention_row_without_keys_gets_zeros(target, table_pages):
    """A negative position sees no key: zeros, next to rows that see some (one of them a single
    key, so most of its splits are empty too)."""
    g = torch.Generator().manual_seed(table_pages)
    block_size, heads, kv_heads, d = 16, 4, 2, 64
    k_cache, v_cache = torch.randn(2, table_pages * block_size + 1, kv_heads, d, generator=g)
    tables = torch.randperm(table_pages, generator=g)[None]
    positions = torch.tensor([-1, 0, table_pages * block_size - 1, -5])
    q = torch.randn(4, heads, d, generator=g)
    rest = (target.to(tables), target.to(torch.zeros(4, dtype=torch.long)), target.to(positions),
            block_size, d ** -0.5, 0)
    got = target.ops.paged_attention(target.to(q), target.to(k_cache), target.to(v_cache), *rest)
    assert torch.equal(got[positions < 0].float().cpu(), torch.zeros(2, heads, d))
    expect = ref.paged_attention(target.exact(q), target.exact(k_cache), target.exact(v_cache), *rest)
    torch.testing.assert_close(got.float(), expect, **target.tol)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_paged_attention_splits_replay_from_a_cuda_graph(backend):
    """Split launches captured in a CUDA graph merge right on every replay, and eager calls after
    the replays still do. For Triton the capture's stream has no arrival counters (set aside for
    the test), so the captured launch takes counters of its own and makes no stream buffer."""
    target = Target(backend, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    block_size, lengths, heads, kv_heads, d = 16, [3, 900], 4, 2, 64
    tables, num_blocks = paged_layout(lengths, block_size, g)
    k_cache, v_cache = (target.to(torch.randn(num_blocks * block_size + 1, kv_heads, d, generator=g))
                        for _ in range(2))
    meta = [target.to(t) for t in (tables, torch.arange(2), torch.tensor(lengths) - 1)]
    q = target.to(torch.randn(2, heads, d, generator=g))
    rest = (*meta, block_size, d ** -0.5, 0)
    target.ops.paged_attention(q, k_cache, v_cache, *rest)       # compiles (Triton) outside the capture
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    from anee_fast.kernels import paged_attention as triton_paged_attention
    key = (str(q.device), stream.cuda_stream)
    set_aside = triton_paged_attention._ARRIVALS.pop(key, None) if backend == "triton" else None
    with torch.cuda.graph(graph, stream=stream):
        out = target.ops.paged_attention(q, k_cache, v_cache, *rest)
    if backend == "triton":
        assert key not in triton_paged_attention._ARRIVALS
        if set_aside is not None:
            triton_paged_attention._ARRIVALS[key] = set_aside
    for scale in (1.0, -2.0, 0.5):
        fresh = target.to(scale * torch.randn(2, heads, d, generator=g))
        q.copy_(fresh)
        graph.replay()
        expect = ref.paged_attention(fresh.float(), k_cache.float(), v_cache.float(), *rest)
        torch.testing.assert_close(out.float(), expect, **target.tol)
        eager = target.ops.paged_attention(fresh, k_cache, v_cache, *rest)
        torch.testing.assert_close(eager.float(), expect, **target.tol)


ISA_CHECK = """
import torch
from anee_fast.ops.backends import ops_for
from anee_fast.ops import reference as ref
ops = ops_for("native")
g = torch.Generator().manual_seed(3)
block_size, heads, kv_heads, d = 16, 6, 2, 64
for n, window in ((1, 0), (77, 0), (300, 0), (300, 40)):
    tables = torch.randperm(40, generator=g)[None, :]
    k, v = torch.randn(2, 40 * block_size + 1, kv_heads, d, generator=g) * 3
    q = torch.randn(n, heads, d, generator=g) * 3
    meta = (tables, torch.zeros(n, dtype=torch.long), torch.arange(n) + (640 - n))
    for dtype, atol, rtol in ((torch.float32, 1e-4, 1e-5), (torch.bfloat16, 6e-2, 2e-2)):
        got = ops.paged_attention(q.to(dtype), k.to(dtype), v.to(dtype), *meta, block_size, d ** -0.5, window)
        expect = ref.paged_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), *meta,
                                     block_size, d ** -0.5, window)
        torch.testing.assert_close(got.float(), expect, atol=atol, rtol=rtol)
print("ok")
"""


@pytest.mark.parametrize("isa", ["best", "avx2", "scalar"])
def test_native_paged_attention_on_every_instruction_set(isa):
    """The attention's loops compiled for the CPU's best set (AVX-512 where it has it), AVX2 and
    the baseline, the lesser ones chosen with ANEE_FAST_CPU_ISA in a fresh process: long contexts
    from scaled scores (the softmax's exp far below the largest score), windows that start inside
    a cache block, float32 and bfloat16."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if isa != "best":
        env["ANEE_FAST_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
