"""Every op of every compiled backend against the pure-PyTorch reference (reference_ops).

Fresh random inputs, odd sizes, GQA, block sizes 8/16/32, head dims 64 and 80, caches poisoned
with a sentinel: every slot meant to be written is written, every other slot stays bit-equal.
Cache writes that are copies must match exactly. On the CPU the Triton kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest), so shapes stay small.
"""
import os

import pytest
import torch

from anee_fast import LLM, SamplingParams, backends
from anee_fast.ops import reference as ref
from anee_fast.ops.backends import ops_for, select_backend
from conftest import build_model, random_actions, random_ids

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
SENTINEL = 7.25
# (backend, device, dtype): the CPU cases run in CI; the `cuda` ones on a GPU (make test-gpu), where
# native runs the csrc/cuda kernels (Target fails when the build has none: no silent CPU fallback).
TARGETS = [("triton", "cpu", torch.float32), ("native", "cpu", torch.float32)] + [
    pytest.param((backend, "cuda", dtype), marks=pytest.mark.cuda, id=f"{backend}-cuda-{str(dtype)[6:]}")
    for backend in ("triton", "native") for dtype in (torch.float32, torch.bfloat16)]


class Target:
    """A backend's ops on a device and dtype; `to` moves test inputs there. The reference runs
    in float32 on the same (rounded) inputs."""

    def __init__(self, backend, device, dtype):
        status = backends(device)[backend]
        assert status is True, f"backend {backend} is not available on {device}: {status}"
        self.ops, self.device, self.dtype = ops_for(backend), torch.device(device), dtype
        self.tol = TOL[dtype]

    def to(self, t):
        if t is None:
            return None
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def exact(self, t):
        """The float32 reference input equal to what the kernel reads."""
        return None if t is None else self.to(t).float() if t.is_floating_point() else self.to(t)


@pytest.fixture(params=TARGETS, ids=lambda t: "-".join([t[0], t[1], str(t[2])[6:]]))
def target(request):
    return Target(*request.param)


def poisoned_caches(shape, target):
    """A K and a V cache filled with the sentinel."""
    return (torch.full(shape, SENTINEL, device=target.device, dtype=target.dtype),
            torch.full(shape, SENTINEL, device=target.device, dtype=target.dtype))


def slot_mapping(rows, slots, gen, padding=True):
    """Distinct slots for the rows; rows 1, 4, 7, ... are padding (-1) when asked."""
    mapping = torch.randperm(slots, generator=gen)[:rows]
    if padding:
        mapping[1::3] = -1
    return mapping


# ---- norm ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 83), (83, 576)])
@pytest.mark.parametrize("rms,with_bias", [(True, False), (False, True)])
def test_norm(target, rows, hidden, rms, with_bias):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g) * 3
    w = 1 + 0.3 * torch.randn(hidden, generator=g)
    b = 0.3 * torch.randn(hidden, generator=g) if with_bias else None
    got = target.ops.norm(target.to(x), target.to(w), target.to(b), 1e-5, rms)
    expect = ref.norm(target.exact(x), target.exact(w), target.exact(b), 1e-5, rms)
    assert got.dtype == target.dtype
    torch.testing.assert_close(got.float(), expect, **target.tol)


@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 83), (83, 576)])
@pytest.mark.parametrize("rms,with_bias", [(True, False), (False, True)])
def test_add_norm(target, rows, hidden, rms, with_bias):
    g = torch.Generator().manual_seed(rows * hidden + 1)
    x, residual = torch.randn(2, rows, hidden, generator=g) * 3
    w = 1 + 0.3 * torch.randn(hidden, generator=g)
    b = 0.3 * torch.randn(hidden, generator=g) if with_bias else None
    total, normed = target.ops.add_norm(target.to(x), target.to(residual), target.to(w), target.to(b),
                                        1e-5, rms)
    # The sum is the dtype's own add (exact in float32, one rounding in bf16); the norm reads
    # that rounded sum.
    expect_total = target.to(x) + target.to(residual)
    assert total.dtype == normed.dtype == target.dtype
    assert torch.equal(total, expect_total)
    expect = ref.norm(expect_total.float(), target.exact(w), target.exact(b), 1e-5, rms)
    torch.testing.assert_close(normed.float(), expect, **target.tol)


# ---- linear --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 83])    # native's CPU kernel serves <= 16 rows
@pytest.mark.parametrize("in_features,out_features", [(48, 7), (83, 769), (768, 130)])
@pytest.mark.parametrize("with_bias,weight_layout", [(False, "rows of a stack"), (True, "transposed")])
def test_linear(target, rows, in_features, out_features, with_bias, weight_layout):
    g = torch.Generator().manual_seed(rows * in_features + out_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    b = torch.randn(out_features, generator=g) if with_bias else None
    if weight_layout == "rows of a stack":      # a view at an offset, like a fused QKV's K|V rows
        stack = target.to(torch.randn(out_features + 5, in_features, generator=g))
        stack[3:3 + out_features] = target.to(w)
        w_in = stack[3:3 + out_features]
    else:                                       # a transposed view: column stride 1 is not given
        w_in = target.to(w.t().contiguous()).t()
    got = target.ops.linear(target.to(x), w_in, target.to(b))
    expect = ref.linear(target.exact(x), target.exact(w), target.exact(b))
    assert got.dtype == target.dtype and got.shape == (rows, out_features)
    torch.testing.assert_close(got.float(), expect, **target.tol)
    # Leading dims other than one: [2, rows, in] -> [2, rows, out].
    got = target.ops.linear(target.to(torch.stack([x, -x])), w_in, target.to(b))
    assert got.shape == (2, rows, out_features)
    torch.testing.assert_close(got[1].float(), ref.linear(-target.exact(x), target.exact(w),
                                                          target.exact(b)), **target.tol)


def weight_view(target, layout, in_features, out_features, gen):
    """A weight [out_features, in_features] as the model hands it to linear: rows 2.. of a taller
    stack (a fused QKV's K|V rows), or the first columns of a wider one (row stride in + 8)."""
    if layout == "rows of a stack":
        stack = torch.randn(out_features + 4, in_features, generator=gen)
        return target.to(stack / in_features ** 0.5)[2:2 + out_features]
    stack = torch.randn(out_features, in_features + 8, generator=gen)
    return target.to(stack / in_features ** 0.5)[:, :in_features]


# K = 83 takes the GEMVs' scalar loads; K = 128 in a column slice (rows 16-byte aligned) their
# 16-byte loads on CUDA.
GEMV_WEIGHTS = [(83, "rows of a stack"), (128, "columns of a stack")]


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 83])       # native's CUDA kernel serves <= 8 rows
@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "silu_gated"])
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("in_features,layout", GEMV_WEIGHTS)
def test_linear_epilogues(target, rows, activation, with_bias, with_residual, in_features, layout):
    """activation(x W^T + b) + residual, each step rounded to the dtype as separate ops do; the
    weight a view of a stack, widths odd (gated: 2 x 65 rows)."""
    g = torch.Generator().manual_seed(rows * 7 + len(activation) + with_bias + in_features)
    out_features = 130
    x = torch.randn(rows, in_features, generator=g)
    w = weight_view(target, layout, in_features, out_features, g)
    b = torch.randn(out_features, generator=g) if with_bias else None
    width = out_features // 2 if activation == "silu_gated" else out_features
    residual = torch.randn(rows, width, generator=g) if with_residual else None
    got = target.ops.linear(target.to(x), w, target.to(b), activation, target.to(residual))
    assert got.dtype == target.dtype and got.shape == (rows, width)
    # The reference on the target's dtype (its roundings between the steps), compared in float32.
    expect = ref.linear(target.to(x), w.contiguous(), target.to(b), activation, target.to(residual))
    torch.testing.assert_close(got.float(), expect.float(), **target.tol)


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 83])
@pytest.mark.parametrize("activation,with_residual", [("none", False), ("gelu_tanh", True),
                                                      ("silu_gated", True), ("none", True)])
@pytest.mark.parametrize("in_features,layout", GEMV_WEIGHTS)
def test_linear_row_mask(target, rows, activation, with_residual, in_features, layout):
    """A masked-off row contributes exactly zero (its x NaN: a select, not a product), so it gets
    its residual back bit for bit; the other rows are the unmasked op's."""
    g = torch.Generator().manual_seed(rows * 11 + len(activation) + with_residual + in_features)
    out_features = 130
    x = torch.randn(rows, in_features, generator=g)
    w = weight_view(target, layout, in_features, out_features, g)
    b = torch.randn(out_features, generator=g)
    width = out_features // 2 if activation == "silu_gated" else out_features
    residual = torch.randn(rows, width, generator=g) if with_residual else None
    keep = torch.rand(rows, generator=g) < 0.5
    keep[0] = rows > 1                       # one row: masked off; more: the first one kept
    poisoned = torch.where(keep[:, None], x, torch.nan)
    args = (w, target.to(b), activation)
    got = target.ops.linear(target.to(poisoned), *args, target.to(residual), target.to(keep))
    assert got.dtype == target.dtype and got.shape == (rows, width)
    off = target.to(~keep)
    expect_off = torch.zeros_like(got[off]) if residual is None else target.to(residual)[off]
    assert torch.equal(got[off], expect_off)
    expect = ref.linear(target.to(x), w.contiguous(), target.to(b), activation, target.to(residual))
    torch.testing.assert_close(got[target.to(keep)].float(), expect[target.to(keep)].float(),
                               **target.tol)
    # A mask of x's leading shape, [2, rows] for x [2, rows, in].
    both = target.ops.linear(target.to(torch.stack([x, poisoned])), *args,
                             None if residual is None else target.to(torch.stack([residual] * 2)),
                             target.to(torch.stack([torch.ones_like(keep), keep])))
    torch.testing.assert_close(both[0].float(), expect.float(), **target.tol)
    assert torch.equal(both[1][off], expect_off)
    torch.testing.assert_close(both[1].float(), got.float(), **target.tol)


def test_linear_rejects_bad_epilogues(target):
    x, w = target.to(torch.randn(3, 8)), target.to(torch.randn(5, 8))
    with pytest.raises((RuntimeError, ValueError), match="activation must be"):
        target.ops.linear(x, w, None, "relu")
    with pytest.raises((RuntimeError, ValueError)):                  # 5 rows cannot be gate | up
        target.ops.linear(x, w, None, "silu_gated")
    with pytest.raises((RuntimeError, ValueError)):                  # residual [3, 4] for [3, 5]
        target.ops.linear(x, w, None, "none", target.to(torch.randn(3, 4)))
    with pytest.raises((RuntimeError, ValueError), match=r"bias must be \[5\]"):   # not read past
        target.ops.linear(x, w, target.to(torch.randn(4)), "gelu_tanh")
    for bad_mask in (torch.ones(3, dtype=torch.uint8), torch.ones(4, dtype=torch.bool),
                     torch.ones(3, 1, dtype=torch.bool)):
        with pytest.raises((RuntimeError, ValueError), match="row_mask must be bool"):
            target.ops.linear(x, w, None, "none", None, target.to(bad_mask))


def test_native_linear_rejects_bad_shapes_and_dtypes():
    ops = ops_for("native")
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="x has 7 features, weight expects 8"):
        ops.linear(torch.randn(3, 7), w)
    with pytest.raises(RuntimeError, match=r"bias must be \[5\]"):
        ops.linear(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.linear(x, w.double())
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.linear(x, w[None])


# ---- write_kv ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 7, 83])
@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (3, 80)])
def test_write_kv_copies_exactly_and_touches_nothing_else(target, rows, kv_heads, head_dim):
    g = torch.Generator().manual_seed(rows + head_dim)
    slots = 97
    k, v = target.to(torch.randn(2, rows, kv_heads, head_dim, generator=g))
    mapping = target.to(slot_mapping(rows, slots, g))
    k_cache, v_cache = poisoned_caches((slots + 1, kv_heads, head_dim), target)
    target.ops.write_kv(k, v, k_cache, v_cache, mapping)
    expect_k, expect_v = poisoned_caches((slots + 1, kv_heads, head_dim), target)
    ref.write_kv(k, v, expect_k, expect_v, mapping)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
    assert (k_cache[slots] == SENTINEL).all(), "padding rows must write nothing"


# ---- skip_kv -------------------------------------------------------------------------------------

def skip_kv_inputs(rows, hidden, heads, kv_heads, head_dim, layers, rope, bias, gen):
    """Weights as the model stores them: [L, 2kv + q, hidden] stacked, the K|V rows a view."""
    kv, q = 2 * kv_heads * head_dim, heads * head_dim
    total_layers = layers + 2
    kvq = torch.randn(total_layers, kv + q, hidden, generator=gen) / hidden ** 0.5
    kvq_bias = 0.1 * torch.randn(total_layers, kv + q, generator=gen) if bias else None
    norm_w = 1 + 0.2 * torch.randn(total_layers, hidden, generator=gen)
    norm_b = 0.2 * torch.randn(total_layers, hidden, generator=gen) if bias else None
    first = 1                                                         # a slice of the stack
    return dict(
        h=torch.randn(rows, hidden, generator=gen),
        norm_weight=norm_w[first:first + layers],
        norm_bias=None if norm_b is None else norm_b[first:first + layers],
        kv_weight=kvq[first:first + layers, :kv],
        kv_bias=None if kvq_bias is None else kvq_bias[first:first + layers, :kv],
        positions=torch.randint(0, 500, (rows,), generator=gen),
        inv_freq=(1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)) if rope else None,
        rope_scale=1.25 if rope else 1.0)


@pytest.mark.parametrize("rows,hidden,heads,kv_heads,head_dim", [
    (1, 48, 6, 2, 64), (7, 83, 4, 2, 80), (83, 64, 3, 3, 64)])
@pytest.mark.parametrize("layers,use_first_layer", [(1, False), (3, True)])
@pytest.mark.parametrize("rope,bias,rms", [(True, False, True), (False, True, False)])
def test_skip_kv(target, rows, hidden, heads, kv_heads, head_dim, layers, use_first_layer, rope, bias, rms):
    check_skip_kv(target, rows, hidden, heads, kv_heads, head_dim, layers, use_first_layer, rope,
                  bias, rms)


# Triton's interpreter takes seconds a case at this width: native on the CPU, every backend on a GPU.
@pytest.mark.parametrize("target", [t for t in TARGETS if t != ("triton", "cpu", torch.float32)],
                         indirect=True, ids=lambda t: "-".join([t[0], t[1], str(t[2])[6:]]))
@pytest.mark.parametrize("layers,use_first_layer", [(1, False), (3, True)])
def test_skip_kv_row_wider_than_the_cuda_kernels_shared_memory(target, layers, use_first_layer):
    """hidden 12300: the decode kernel's normalised row would not fit 48 KB of shared memory."""
    check_skip_kv(target, 2, 12300, 1, 1, 64, layers, use_first_layer, True, True, False)


def check_skip_kv(target, rows, hidden, heads, kv_heads, head_dim, layers, use_first_layer, rope,
                  bias, rms):
    """skip_kv into a poisoned layer slice of a bigger cache against the reference."""
    g = torch.Generator().manual_seed(rows * 31 + layers)
    args = skip_kv_inputs(rows, hidden, heads, kv_heads, head_dim, layers, rope, bias, g)
    slots = 61 + rows
    mapping = target.to(slot_mapping(rows, slots, g))
    first_layer = torch.randint(0, layers + 1, (rows,), generator=g) if use_first_layer else None
    first_layer = target.to(first_layer)
    # The kernel writes into a layer slice of a bigger cache, as the engine passes cache.k[l:l+n].
    shape = (layers + 2, slots + 1, kv_heads, head_dim)
    k_full, v_full = poisoned_caches(shape, target)
    k_exp, v_exp = torch.full(shape, SENTINEL, device=target.device), torch.full(shape, SENTINEL, device=target.device)
    inv_freq = args.pop("inv_freq")
    inv_freq = None if inv_freq is None else inv_freq.to(target.device)      # always float32
    target.ops.skip_kv(**{k: (target.to(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()},
                       inv_freq=inv_freq, k_cache=k_full[1:1 + layers], v_cache=v_full[1:1 + layers],
                       slot_mapping=mapping, first_layer=first_layer, eps=1e-5, rms=rms)
    ref.skip_kv(**{k: (target.exact(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()},
                inv_freq=inv_freq, k_cache=k_exp[1:1 + layers], v_cache=v_exp[1:1 + layers],
                slot_mapping=mapping, first_layer=first_layer, eps=1e-5, rms=rms)
    written = k_exp != SENTINEL
    assert written.any()
    assert torch.equal(k_full[~written].float(), k_exp[~written]), "a slot not meant to be written changed"
    torch.testing.assert_close(k_full.float(), k_exp, **target.tol)
    torch.testing.assert_close(v_full.float(), v_exp, **target.tol)


@pytest.mark.parametrize("rows,hidden,heads,kv_heads,head_dim", [
    (1, 48, 6, 2, 64), (2, 83, 4, 2, 80), (7, 83, 4, 2, 80), (83, 64, 3, 3, 64)])
@pytest.mark.parametrize("rope,bias,rms", [(True, False, True), (False, True, False)])
def test_skip_kv_with_q_out(target, rows, hidden, heads, kv_heads, head_dim, rope, bias, rms):
    """With q_out, the weights are K|V|Q: the cache gets K/V as without it, and every row, a
    padding row too, gets its query (RoPE'd like K) in q_out, poisoned with NaN before."""
    g = torch.Generator().manual_seed(rows * 37 + head_dim)
    args = skip_kv_inputs(rows, hidden, heads, kv_heads, head_dim, 1, rope, bias, g)
    kv = 2 * kv_heads * head_dim
    stack_w, stack_b = args["kv_weight"]._base, None if not bias else args["kv_bias"]._base
    args["kv_weight"] = stack_w[1:2]                               # K|V|Q rows of the layer
    args["kv_bias"] = None if stack_b is None else stack_b[1:2]
    assert args["kv_weight"].shape[1] == kv + heads * head_dim
    slots = 61 + rows
    mapping = target.to(slot_mapping(rows, slots, g))
    shape = (3, slots + 1, kv_heads, head_dim)
    k_full, v_full = poisoned_caches(shape, target)
    k_exp, v_exp = torch.full(shape, SENTINEL, device=target.device), torch.full(shape, SENTINEL, device=target.device)
    q_out = torch.full((rows, heads, head_dim), float("nan"), device=target.device, dtype=target.dtype)
    q_exp = torch.empty(rows, heads, head_dim, device=target.device)
    inv_freq = args.pop("inv_freq")
    inv_freq = None if inv_freq is None else inv_freq.to(target.device)
    target.ops.skip_kv(**{k: (target.to(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()},
                       inv_freq=inv_freq, k_cache=k_full[1:2], v_cache=v_full[1:2],
                       slot_mapping=mapping, first_layer=None, eps=1e-5, rms=rms, q_out=q_out)
    ref.skip_kv(**{k: (target.exact(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()},
                inv_freq=inv_freq, k_cache=k_exp[1:2], v_cache=v_exp[1:2],
                slot_mapping=mapping, first_layer=None, eps=1e-5, rms=rms, q_out=q_exp)
    written = k_exp != SENTINEL
    assert written.any() and not q_out.isnan().any()
    assert torch.equal(k_full[~written].float(), k_exp[~written]), "a slot not meant to be written changed"
    torch.testing.assert_close(k_full.float(), k_exp, **target.tol)
    torch.testing.assert_close(v_full.float(), v_exp, **target.tol)
    torch.testing.assert_close(q_out.float(), q_exp, **target.tol)


def test_skip_kv_q_out_needs_one_layer_and_the_q_rows(target):
    g = torch.Generator().manual_seed(5)
    args = skip_kv_inputs(3, 48, 4, 2, 64, 2, False, False, g)
    args = {k: (target.to(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    k_cache, v_cache = poisoned_caches((2, 9, 2, 64), target)
    q_out = torch.empty(3, 4, 64, device=target.device, dtype=target.dtype)
    common = dict(slot_mapping=target.to(torch.tensor([0, 1, 2])), first_layer=None, eps=1e-5,
                  rms=True, q_out=q_out)
    with pytest.raises((RuntimeError, ValueError), match="one layer"):
        target.ops.skip_kv(**args, k_cache=k_cache, v_cache=v_cache, **common)
    one = {**args, "norm_weight": args["norm_weight"][:1], "kv_weight": args["kv_weight"][:1]}
    with pytest.raises((RuntimeError, ValueError), match="kv_weight"):      # K|V rows only
        target.ops.skip_kv(**one, k_cache=k_cache[:1], v_cache=v_cache[:1], **common)


# ---- paged_attention -----------------------------------------------------------------------------

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


# ---- saturation_codes ----------------------------------------------------------------------------

def at_cosine(h, cos, gen):
    """Rows at the given cosines to h's rows, of the same norms."""
    other = torch.randn(h.shape, generator=gen)
    other -= (other * h).sum(-1, keepdim=True) / (h * h).sum(-1, keepdim=True) * h
    other = other / other.norm(dim=-1, keepdim=True) * h.norm(dim=-1, keepdim=True)
    return cos[:, None] * h + (1 - cos[:, None] ** 2).sqrt() * other


@pytest.mark.parametrize("rows,hidden", [(1, 48), (7, 83), (83, 768)])
def test_saturation_codes(target, rows, hidden):
    """Every row's code equals the reference's: rows whose residual did not move PROCESS, the
    others SKIP or EXIT by their cosine; budget_left under the threshold EXITs. Cosines are
    drawn away from the thresholds (the sums' order differs between backends)."""
    g = torch.Generator().manual_seed(rows * hidden)
    h = torch.randn(rows, hidden, generator=g) * 2
    n = torch.arange(rows)
    cos = torch.tensor([0.5, 0.985, 0.999, -0.3, 0.9, 0.9995])[n % 6]
    h_prev = at_cosine(h, cos, g)
    h_prev[n % 5 == 4] = h[n % 5 == 4]                        # the previous layer skipped
    budget_left = torch.where(n % 7 == 6, -0.05, 0.3)          # under the threshold: EXIT
    h_t, prev_t = target.to(h), target.to(h_prev)
    args = (0.98, 0.995, 0.05)
    got = target.ops.saturation_codes(h_t, prev_t, budget_left.to(target.device), *args)
    expect = ref.saturation_codes(h_t, prev_t, budget_left.to(target.device), *args)
    assert got.dtype == torch.int8 and got.shape == (rows,)
    assert torch.equal(got.cpu(), expect.cpu())
    if rows >= 7:
        assert {0, 1, 2} <= set(expect.tolist())


def test_saturation_codes_is_the_heuristic_controller(target):
    """HeuristicController proposes through the backend's op: the same codes as its rule written
    as tensor ops (the reference) on a layer context."""
    from anee_fast.control.controllers import HeuristicController, LayerContext
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 32, generator=g)
    h_prev = at_cosine(h, torch.tensor([0.2, 0.99, 0.9999] * 3), g)
    h_prev[0] = h[0]
    ctx = LayerContext(layer=2, num_layers=8, h=target.to(h), h_prev=target.to(h_prev),
                       budget_left=torch.full((9,), 0.5, device=target.device), ops=target.ops)
    got = HeuristicController().propose(ctx)
    expect = ref.saturation_codes(target.to(h), target.to(h_prev), ctx.budget_left, 0.98, 0.995, 0.0)
    assert torch.equal(got.cpu(), expect.cpu()) and got.tolist()[:3] == [0, 1, 2]


# ---- policy_step ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 7, 83, 1100])        # 1100: more than one program / block
@pytest.mark.parametrize("forced,stop_code", [(False, 2), (False, 1), (True, 2)])
def test_policy_step_equals_the_rule_exactly(target, rows, forced, stop_code):
    """Actions, the PROCESS mask, stopped and spent (float32) equal the reference bit for bit,
    budget boundaries included; the other layers' actions stay untouched."""
    g = torch.Generator().manual_seed(rows + stop_code + 10 * forced)
    L, layer, skip_cost = 6, 3, 0.0877
    proposed = torch.randint(0, 3, (rows,), generator=g, dtype=torch.int8)
    spent = torch.randint(0, 4, (rows,), generator=g).float() + skip_cost * torch.randint(0, 3, (rows,), generator=g)
    stopped = torch.rand(rows, generator=g) < 0.2
    commitment = 1 + 2 * skip_cost
    # Every third token sits exactly on its budget: spent + commitment == allowed.
    allowed = torch.where(torch.arange(rows) % 3 == 0, spent + commitment,
                          spent + commitment + torch.randn(rows, generator=g))
    actions = torch.full((rows, L), 7, dtype=torch.int8)
    dev = target.device
    state = [t.to(dev) for t in (proposed, spent, stopped, allowed, actions)]
    expect = [t.clone() for t in state]
    got_process = target.ops.policy_step(*state, layer, commitment, skip_cost, stop_code, forced)
    expect_process = ref.policy_step(*expect, layer, commitment, skip_cost, stop_code, forced)
    assert torch.equal(got_process, expect_process)
    for got, exp in zip(state[1:], expect[1:]):     # spent, stopped, allowed, actions
        assert torch.equal(got, exp)
    assert (state[4][:, [0, 1, 2, 4, 5]] == 7).all()
    if rows > 1:        # the inputs exercise both outcomes
        assert expect_process.any() and (forced or not expect_process.all())


@pytest.mark.parametrize("rows", [1, 83, 1100])
@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("rule", ["target", "reference"])
def test_policy_step_starts_the_state_at_layer_0(target, rows, forced, rule):
    """At layer 0 spent and stopped are written, not read: NaN-poisoned spent and all-stopped
    tokens give what a zero, not-stopped state gives."""
    ops = target.ops if rule == "target" else ref
    g = torch.Generator().manual_seed(rows + forced)
    proposed = torch.randint(0, 3, (rows,), generator=g, dtype=torch.int8)
    allowed = 2.0 + torch.rand(rows, generator=g) * 3     # some tokens can run layer 0, some not
    commitment = 3.5
    dev = target.device
    poisoned = [t.to(dev) for t in (proposed, torch.full((rows,), float("nan")),
                                    torch.ones(rows, dtype=torch.bool), allowed,
                                    torch.full((rows, 4), 7, dtype=torch.int8))]
    fresh = [t.to(dev) for t in (proposed, torch.zeros(rows), torch.zeros(rows, dtype=torch.bool),
                                 allowed, torch.full((rows, 4), 7, dtype=torch.int8))]
    got = ops.policy_step(*poisoned, 0, commitment, 0.25, 2, forced)
    expect = ref.policy_step(*fresh, 0, commitment, 0.25, 2, forced)
    assert torch.equal(got, expect)
    for g_t, e_t in zip(poisoned[1:], fresh[1:]):        # spent, stopped, allowed, actions
        assert torch.equal(g_t, e_t)
    if rows > 1 and not forced:
        assert expect.any() and not expect.all()


# ---- end to end ----------------------------------------------------------------------------------

# Triton's interpreter is slow: on the CPU it runs one architecture end to end (the op tests
# above cover LayerNorm, biases and MHA); on a GPU every architecture.
END_TO_END = [("native", a) for a in ("gpt2", "llama_gqa", "qwen2")] + [
    ("triton", a) for a in (("llama_gqa",) if os.environ.get("TRITON_INTERPRET") == "1"
                            else ("gpt2", "llama_gqa", "qwen2"))]


@pytest.mark.parametrize("backend,arch", END_TO_END)
def test_engine_matches_reference_end_to_end(backend, arch):
    assert backends()[backend] is True, backends()[backend]
    model = build_model(arch, num_layers=3)
    fast, slow = LLM(model, backend=backend, block_size=8), LLM(model, backend="reference", block_size=8)
    ids = random_ids(model, 19, seed=3)
    actions = random_actions(19, 3, seed=4)
    for chunk in (None, 1):
        torch.testing.assert_close(fast.score(ids, actions, chunk_size=chunk),
                                   slow.score(ids, actions, chunk_size=chunk), atol=1e-4, rtol=1e-4)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [random_ids(model, n, seed=n).tolist() for n in (3, 9)]
    for controller, budget in (("budget", 1.0), ("heuristic", 0.6)):
        a = fast.generate(prompts, params, energy_budget=budget, controller=controller)
        b = slow.generate(prompts, params, energy_budget=budget, controller=controller)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert all(torch.equal(x.trace.actions, y.trace.actions) for x, y in zip(a, b))


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa", "llama_variants", "qwen2"])
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_engine_on_the_gpu_matches_the_cpu_reference(backend, arch):
    """float32 on the GPU against the CPU reference: logits under a fixed action matrix (whole
    prompt, token by token, ragged batch) and greedy tokens and actions under the controllers."""
    model = build_model(arch, num_layers=3)
    gpu = LLM(model, backend=backend, device="cuda", dtype=torch.float32, block_size=8)
    cpu = LLM(model, backend="reference", device="cpu", block_size=8)
    ids = random_ids(model, 21, seed=5)
    actions = random_actions(21, 3, seed=6)
    for chunk in (None, 1):
        torch.testing.assert_close(gpu.score(ids, actions, chunk_size=chunk).cpu(),
                                   cpu.score(ids, actions, chunk_size=chunk), atol=1e-3, rtol=1e-3)
    ragged = [random_ids(model, n, seed=n) for n in (4, 13)]
    ragged_actions = [random_actions(n, 3, seed=n + 1) for n in (4, 13)]
    for a, b in zip(gpu.score(ragged, ragged_actions), cpu.score(ragged, ragged_actions)):
        torch.testing.assert_close(a.cpu(), b, atol=1e-3, rtol=1e-3)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [random_ids(model, n, seed=n).tolist() for n in (3, 9, 17)]
    for controller, budget in (("budget", 1.0), ("budget", 0.5), ("heuristic", 0.6)):
        a = gpu.generate(prompts, params, energy_budget=budget, controller=controller)
        b = cpu.generate(prompts, params, energy_budget=budget, controller=controller)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert all(torch.equal(x.trace.actions, y.trace.actions) for x, y in zip(a, b))


def test_backends_report_reasons_and_selection_errors(monkeypatch):
    found = backends()
    assert found["reference"] is True
    assert all(v is True or (isinstance(v, str) and v) for v in found.values())
    with pytest.raises(ValueError, match="unknown backend"):
        LLM(build_model("gpt2"), backend="cuda-magic")
    assert select_backend("auto", "cpu") in ("native", "reference")   # never the interpreter
    monkeypatch.setenv("ANEE_FAST_BACKEND", "reference")
    assert LLM(build_model("gpt2")).backend == "reference"
    assert LLM(build_model("gpt2"), backend="native").backend == "native"  # a named choice wins
