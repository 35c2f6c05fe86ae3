"""skip_kv (one layer's norm -> K|V(|Q) projection -> RoPE -> cache write) of every compiled
backend against the reference (see op_cases)."""
import pytest
import torch

from anee_fast.ops import reference as ref
from anee_fast.ops.backends import ops_for
from anee_fast.ops.weight_formats import QUANTIZED, QuantizedWeight, quantize
from op_cases import SENTINEL, TARGETS, poisoned_caches, slot_mapping, target, target_id  # noqa: F401


def skip_kv_inputs(rows, hidden, heads, kv_heads, head_dim, rope, bias, gen, with_q=False,
                   fmt="dense"):
    """One layer's weights as the model stores them: K|V|Q [2kv + q, hidden], whose K|V rows (a
    view) skip_kv reads without q_out; with_q: all of them, for q_out. fmt: the weight quantized
    (weight_formats.py), its K|V rows a QuantizedWeight view likewise."""
    kv, q = 2 * kv_heads * head_dim, heads * head_dim
    rows_used = kv + q if with_q else kv
    kvq = torch.randn(kv + q, hidden, generator=gen) / hidden ** 0.5
    if fmt != "dense":
        kvq = quantize(kvq, fmt)
    kvq_bias = 0.1 * torch.randn(kv + q, generator=gen) if bias else None
    return dict(
        h=torch.randn(rows, hidden, generator=gen),
        norm_weight=1 + 0.2 * torch.randn(hidden, generator=gen),
        norm_bias=0.2 * torch.randn(hidden, generator=gen) if bias else None,
        kv_weight=kvq[:rows_used],
        kv_bias=None if kvq_bias is None else kvq_bias[:rows_used],
        positions=torch.randint(0, 500, (rows,), generator=gen),
        inv_freq=(1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)) if rope else None,
        rope_scale=1.25 if rope else 1.0)


@pytest.mark.parametrize("rows,hidden,heads,kv_heads,head_dim", [
    (1, 48, 6, 2, 64), (7, 83, 4, 2, 80), (83, 64, 3, 3, 64)])
@pytest.mark.parametrize("rope,bias,rms", [(True, False, True), (False, True, False)])
def test_skip_kv(target, rows, hidden, heads, kv_heads, head_dim, rope, bias, rms):
    check_skip_kv(target, rows, hidden, heads, kv_heads, head_dim, rope, bias, rms)


# Triton's interpreter takes seconds a case at this width: native on the CPU, every backend on a GPU.
@pytest.mark.parametrize("target", [t for t in TARGETS if t != ("triton", "cpu", torch.float32)],
                         indirect=True, ids=target_id)
def test_skip_kv_row_wider_than_the_cuda_kernels_shared_memory(target):
    """hidden 12300: the decode kernel's normalised row would not fit 48 KB of shared memory."""
    check_skip_kv(target, 2, 12300, 1, 1, 64, True, True, False)


def on_target(target, v):
    """A skip_kv argument on the target (tensors in its dtype, a quantized weight as it is)."""
    if isinstance(v, QuantizedWeight):
        return v.to(target.device)
    return target.to(v) if isinstance(v, torch.Tensor) else v


def exact(target, v):
    if isinstance(v, QuantizedWeight):
        return v.to(target.device)
    return target.exact(v) if isinstance(v, torch.Tensor) else v


def check_skip_kv(target, rows, hidden, heads, kv_heads, head_dim, rope, bias, rms, fmt="dense"):
    """skip_kv into a poisoned layer of a bigger cache against the reference."""
    g = torch.Generator().manual_seed(rows * 31 + 1)
    args = skip_kv_inputs(rows, hidden, heads, kv_heads, head_dim, rope, bias, g, fmt=fmt)
    slots = 61 + rows
    mapping = target.to(slot_mapping(rows, slots, g))
    # The kernel writes into one layer of a bigger cache, as the engine passes cache.k[l].
    shape = (3, slots + 1, kv_heads, head_dim)
    k_full, v_full = poisoned_caches(shape, target)
    k_exp, v_exp = torch.full(shape, SENTINEL, device=target.device), torch.full(shape, SENTINEL, device=target.device)
    inv_freq = args.pop("inv_freq")
    inv_freq = None if inv_freq is None else inv_freq.to(target.device)      # always float32
    target.ops.skip_kv(**{k: on_target(target, v) for k, v in args.items()},
                       inv_freq=inv_freq, k_cache=k_full[1], v_cache=v_full[1],
                       slot_mapping=mapping, eps=1e-5, rms=rms)
    ref.skip_kv(**{k: exact(target, v) for k, v in args.items()},
                inv_freq=inv_freq, k_cache=k_exp[1], v_cache=v_exp[1],
                slot_mapping=mapping, eps=1e-5, rms=rms)
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
    check_skip_kv_with_q_out(target, rows, hidden, heads, kv_heads, head_dim, rope, bias, rms)


def check_skip_kv_with_q_out(target, rows, hidden, heads, kv_heads, head_dim, rope, bias, rms,
                             fmt="dense"):
    g = torch.Generator().manual_seed(rows * 37 + head_dim)
    args = skip_kv_inputs(rows, hidden, heads, kv_heads, head_dim, rope, bias, g, with_q=True, fmt=fmt)
    slots = 61 + rows
    mapping = target.to(slot_mapping(rows, slots, g))
    shape = (3, slots + 1, kv_heads, head_dim)
    k_full, v_full = poisoned_caches(shape, target)
    k_exp, v_exp = torch.full(shape, SENTINEL, device=target.device), torch.full(shape, SENTINEL, device=target.device)
    q_out = torch.full((rows, heads, head_dim), float("nan"), device=target.device, dtype=target.dtype)
    q_exp = torch.empty(rows, heads, head_dim, device=target.device)
    inv_freq = args.pop("inv_freq")
    inv_freq = None if inv_freq is None else inv_freq.to(target.device)
    target.ops.skip_kv(**{k: on_target(target, v) for k, v in args.items()},
                       inv_freq=inv_freq, k_cache=k_full[1], v_cache=v_full[1],
                       slot_mapping=mapping, eps=1e-5, rms=rms, q_out=q_out)
    ref.skip_kv(**{k: exact(target, v) for k, v in args.items()},
                inv_freq=inv_freq, k_cache=k_exp[1], v_cache=v_exp[1],
                slot_mapping=mapping, eps=1e-5, rms=rms, q_out=q_exp)
    written = k_exp != SENTINEL
    assert written.any() and not q_out.isnan().any()
    assert torch.equal(k_full[~written].float(), k_exp[~written]), "a slot not meant to be written changed"
    torch.testing.assert_close(k_full.float(), k_exp, **target.tol)
    torch.testing.assert_close(v_full.float(), v_exp, **target.tol)
    torch.testing.assert_close(q_out.float(), q_exp, **target.tol)


# (what is misshapen, the message names): the removed multi-layer mode's [1, ...] layouts, a
# bias of the wrong length, and q_out with K|V weight rows only.
MISSHAPEN = {
    "stacked caches": (dict(k_cache=(1, 9, 2, 64), v_cache=(1, 9, 2, 64)), "k_cache"),
    "stacked norm_weight": (dict(norm_weight=(1, 48)), "norm_weight"),
    "stacked kv_weight": (dict(kv_weight=(1, 256, 48)), "kv_weight"),
    "short kv_bias": (dict(kv_bias=(255,)), "kv_bias"),
    "q_out without Q rows": (dict(q_out=(3, 4, 64)), "kv_weight"),
}


@pytest.mark.parametrize("case", list(MISSHAPEN))
def test_skip_kv_refuses_misshapen_caches_and_weights(target, case):
    """One layer's tensors only ([hidden], [rows, hidden], [slots, kv_heads, d]); anything else is
    an error naming the tensor, raised before a cache slot is written."""
    shapes, match = MISSHAPEN[case]
    g = torch.Generator().manual_seed(5)
    args = skip_kv_inputs(3, 48, 4, 2, 64, False, True, g)
    args = {k: (target.to(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    k_cache, v_cache = poisoned_caches((9, 2, 64), target)
    args.update(k_cache=k_cache, v_cache=v_cache, slot_mapping=target.to(torch.tensor([0, 1, 2])),
                eps=1e-5, rms=True)
    for name, shape in shapes.items():
        args[name] = torch.full(shape, SENTINEL, device=target.device, dtype=target.dtype)
    with pytest.raises((RuntimeError, ValueError), match=match):
        target.ops.skip_kv(**args)
    assert (args["k_cache"] == SENTINEL).all() and (args["v_cache"] == SENTINEL).all()


# Quantized K|V(|Q) weights (hidden a multiple of 32 for the block formats): the projection is
# linear's, so this checks that skip_kv hands the format over (1 and 7 rows: the GEMV; 20 rows:
# dequantized + at::linear on the native CPU).
@pytest.mark.parametrize("rows,hidden,heads,kv_heads,head_dim", [
    (1, 96, 6, 2, 64), (7, 64, 4, 2, 80), (20, 64, 3, 3, 64)])
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_skip_kv_quantized(target, fmt, rows, hidden, heads, kv_heads, head_dim):
    check_skip_kv(target, rows, hidden, heads, kv_heads, head_dim, True, rows % 2 == 0, True, fmt=fmt)
    check_skip_kv_with_q_out(target, rows, hidden, heads, kv_heads, head_dim, rows > 1, True, False,
                             fmt=fmt)


def test_native_skip_kv_refuses_a_quantized_weight_of_the_wrong_format():
    """kv_weight's bytes must be the named format's rows (the raw op, as native.py calls it): q4_1
    rows read as q8_0 are an error naming kv_weight, raised before a cache slot is written."""
    ops_for("native")               # loads the library
    g = torch.Generator().manual_seed(9)
    a = skip_kv_inputs(3, 64, 4, 2, 64, False, True, g, fmt="q4_1")
    k_cache, v_cache = torch.full((9, 2, 64), SENTINEL), torch.full((9, 2, 64), SENTINEL)
    with pytest.raises(RuntimeError, match="kv_weight"):
        torch.ops.anee_fast.skip_kv(a["h"], a["norm_weight"], a["norm_bias"], a["kv_weight"].data,
                                    a["kv_bias"], a["positions"], None, 1.0, k_cache, v_cache,
                                    torch.tensor([0, 1, 2]), 1e-5, True, None, "q8_0")
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()
