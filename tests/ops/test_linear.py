"""linear (GEMM / GEMV with its epilogues and row mask) of every compiled backend against the
reference (see op_cases)."""
import os
import subprocess
import sys

import pytest
import torch

from anee_fast.ops import reference as ref
from anee_fast.ops.backends import ops_for
from anee_fast.ops.weight_formats import QUANTIZED, QuantizedWeight, quantize, row_bytes
from op_cases import TARGETS, target, target_id  # noqa: F401  (fixture)


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
    with pytest.raises(RuntimeError, match=r"weight must be \[5, 7\], got \[5, 8\]"):
        ops.linear(torch.randn(3, 7), w)
    with pytest.raises(RuntimeError, match=r"bias must be \[5\]"):
        ops.linear(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="bias must have its dtype"):
        ops.linear(x, w, torch.randn(5).double())
    with pytest.raises(RuntimeError, match="must be floating"):
        ops.linear(x, w.to(torch.int32))
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.linear(x, w[None])


# ---- quantized weights (weight_formats.py) and dense weights of another dtype -------------------
# The reference dequantizes and multiplies in float32; the kernels decode in registers (native
# CPU: one row of x factors the block scale out, more rows dequantize each block once, past 16
# rows a dequantized chunk goes to at::linear), so float32 results agree to accumulation order.

def quantized_weight(target, fmt, out_features, in_features, gen):
    w = quantize(torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5, fmt)
    return w.to(target.device)


def x_rows(target, rows, in_features, gen, dtype):
    """x on the target's device in `dtype` (the target's own dtype when None)."""
    x = torch.randn(rows, in_features, generator=gen)
    return target.to(x) if dtype is None else x.to(target.device, dtype)


def close(got, expect, dtype):
    """float32: the reference up to accumulation order; bfloat16: both rounded from float32 sums
    that may differ in their last bits, so one bfloat16 ulp apart at most."""
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert got.dtype == expect.dtype and got.shape == expect.shape
    torch.testing.assert_close(got.float(), expect.float(), **tol)


# Block formats need in_features divisible by 32; int8 takes any (83: a tail past the last 32).
QUANT_SHAPES = [(f, k) for f in QUANTIZED for k in (32, 96, 576)] + [("int8", 83)]


@pytest.mark.parametrize("x_dtype", [None, torch.bfloat16], ids=["x-target-dtype", "x-bf16"])
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 40])    # native CPU: <= 16 GEMV, 17+ at::linear
@pytest.mark.parametrize("fmt,in_features", QUANT_SHAPES)
def test_linear_quantized(target, fmt, in_features, rows, x_dtype):
    g = torch.Generator().manual_seed(rows * 1000 + in_features + len(fmt))
    w = quantized_weight(target, fmt, 37, in_features, g)
    b = torch.randn(37, generator=g)
    x = x_rows(target, rows, in_features, g, x_dtype)
    b = b.to(target.device, x.dtype)
    close(target.ops.linear(x, w, b), ref.linear(x, w, b), x.dtype)
    close(target.ops.linear(x, w), ref.linear(x, w), x.dtype)
    # Leading dims other than one: [2, rows, in] -> [2, rows, out].
    x3 = torch.stack([x, -x])
    got = target.ops.linear(x3, w, b)
    assert got.shape == (2, rows, 37)
    close(got, ref.linear(x3, w, b), x.dtype)


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("activation,with_bias,with_residual,masked", [
    ("none", True, True, False), ("gelu_tanh", True, False, False), ("silu_gated", False, True, False),
    ("none", False, True, True), ("silu_gated", True, True, True)])
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_linear_quantized_epilogues(target, fmt, activation, with_bias, with_residual, masked, rows):
    """Bias, activation, residual and row mask after a quantized product (gated: 2 x 37 rows);
    a masked-off row's x is NaN and it gets its residual back bit for bit."""
    g = torch.Generator().manual_seed(rows * 13 + len(activation) + with_bias + 2 * masked + len(fmt))
    w = quantized_weight(target, fmt, 74, 96, g)
    width = 37 if activation == "silu_gated" else 74
    x = torch.randn(rows, 96, generator=g)
    b = target.to(torch.randn(74, generator=g)) if with_bias else None
    residual = target.to(torch.randn(rows, width, generator=g)) if with_residual else None
    keep = None
    if masked:
        keep = torch.rand(rows, generator=g) < 0.5
        keep[0] = rows > 1
    poisoned = x if keep is None else torch.where(keep[:, None], x, torch.nan)
    got = target.ops.linear(target.to(poisoned), w, b, activation, residual, target.to(keep))
    expect = ref.linear(target.to(x), w, b, activation, residual, target.to(keep))
    close(got, expect, target.dtype)
    if keep is not None and residual is not None:
        assert torch.equal(got[target.to(~keep)], residual[target.to(~keep)])


@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_linear_quantized_row_slices(target, fmt, rows):
    """A row slice of a taller quantized weight (the K|V rows of K|V|Q: a view at an offset) and
    rows further apart than their bytes (a view of a wider buffer) read as the weight they are."""
    g = torch.Generator().manual_seed(rows + len(fmt))
    full = quantized_weight(target, fmt, 131, 64, g)
    x = target.to(torch.randn(rows, 64, generator=g))
    kv = full[5:5 + 67]
    assert kv.data.storage_offset() > 0
    close(target.ops.linear(x, kv), ref.linear(x, kv), target.dtype)
    rb = row_bytes(fmt, 64)
    wide = torch.zeros(67, rb + 24, dtype=torch.uint8, device=target.device)
    wide[:, 8:8 + rb] = kv.data
    spaced = QuantizedWeight(wide[:, 8:8 + rb], fmt, 64)
    assert spaced.data.stride(0) == rb + 24
    close(target.ops.linear(x, spaced), ref.linear(x, kv), target.dtype)


def _float32_targets():
    """The targets whose x is float32 (weights of another dtype serve float32 activations)."""
    return [t for t in TARGETS if (t.values[0] if hasattr(t, "values") else t)[2] == torch.float32]


@pytest.mark.parametrize("target", _float32_targets(), indirect=True, ids=target_id)
@pytest.mark.parametrize("rows", [1, 4, 16, 17])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_linear_dense_weight_of_another_dtype(target, w_dtype, rows):
    """bfloat16 / float16 weights under float32 x: the float32 product of x and the weight."""
    g = torch.Generator().manual_seed(rows * 3 + len(str(w_dtype)))
    w = (torch.randn(53, 96, generator=g) / 96 ** 0.5).to(target.device, w_dtype)
    x = target.to(torch.randn(rows, 96, generator=g))
    b = target.to(torch.randn(53, generator=g))
    close(target.ops.linear(x, w, b, "gelu_tanh"), ref.linear(x, w, b, "gelu_tanh"), torch.float32)


def test_native_linear_quantized_on_two_threads():
    """Rows split between threads (the kernels' parallel_for) give the one-thread result."""
    ops = ops_for("native")
    g = torch.Generator().manual_seed(7)
    w = quantize(torch.randn(1000, 576, generator=g) / 24, "q4_1")
    threads = torch.get_num_threads()
    try:
        for rows in (1, 3, 16):
            x = torch.randn(rows, 576, generator=g)
            torch.set_num_threads(1)
            one = ops.linear(x, w)
            torch.set_num_threads(2)
            close(ops.linear(x, w), one, torch.float32)
            close(one, ref.linear(x, w), torch.float32)
    finally:
        torch.set_num_threads(threads)


ISA_CHECK = """
import torch
from anee_fast.ops.backends import ops_for
from anee_fast.ops import reference as ref
from anee_fast.ops.weight_formats import QUANTIZED, quantize
ops = ops_for("native")
g = torch.Generator().manual_seed(0)
for fmt in QUANTIZED:
    for K in ((83, 96) if fmt == "int8" else (96,)):
        w = quantize(torch.randn(45, K, generator=g) / 10, fmt)
        for rows in (1, 2, 5, 16, 17):
            x = torch.randn(rows, K, generator=g)
            torch.testing.assert_close(ops.linear(x, w), ref.linear(x, w), atol=2e-5, rtol=2e-5)
        x = torch.randn(3, K, generator=g).bfloat16()
        torch.testing.assert_close(ops.linear(x, w).float(), ref.linear(x, w).float(), atol=1e-2, rtol=1e-2)
w = torch.randn(40, 96, generator=g).bfloat16()
x = torch.randn(3, 96, generator=g)
torch.testing.assert_close(ops.linear(x, w), ref.linear(x, w), atol=2e-5, rtol=2e-5)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_native_linear_quantized_on_every_instruction_set(isa):
    """The AVX2 kernels and the at::linear fallback (no AVX2), chosen with ANEE_FAST_CPU_ISA in a
    fresh process (the choice is made once): on an AVX-512 machine the default run never takes
    them."""
    env = dict(os.environ, ANEE_FAST_CPU_ISA=isa, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


ROUNDING_CHECK = """
import torch
from anee_fast.ops.backends import ops_for
from anee_fast.ops.weight_formats import dequantize, quantize
g = torch.Generator().manual_seed(3)
worst = 0.0
for fmt in ("q4_0", "q4_1"):
    for K in (576, 4608, 4800):                 # rows in scale groups; a row a group; a long row
        for large in (0, 1):                    # the half of each block scaled by 1e4
            w = quantize(torch.randn(301, K, generator=g) / 24, fmt)
            x = torch.randn(1, K, generator=g)
            x.view(1, -1, 2, 16)[:, :, large] *= 1e4
            error = (ops_for("native").linear(x, w).double() - x.double() @ dequantize(w).double().t()).abs()[0]
            d = w.data.view(301, K // 32, -1)[:, :, :2].contiguous().view(torch.float16).double().abs()
            xb = x.double().abs().view(1, -1, 32)
            scale = (d * (xb.sum(-1, keepdim=True) + 16 * xb[:, :, 16:].sum(-1, keepdim=True))).sum((1, 2))
            worst = max(worst, (error / (2.0 ** -24 * scale)).max().item())
print(worst)
"""


@pytest.mark.parametrize("kernel", ["exponent", "convert", "avx2"])
def test_native_linear_4bit_one_row_within_float32_rounding(kernel):
    """One row of x against 4-bit blocks: the kernels rearrange x per block (weight_gemv.h,
    factored_block_512 / _256), so their sum differs from the dequantized product by float32
    rounding only, also where the values meeting a block's low and high nibbles differ in scale
    by 1e4 (either way round): the error to the float64 product stays within 32 float32
    roundings of sum |d| (|x| + 16 |x_high|) (measured: at most 6; float32 at::linear on the
    dequantized weight: 2). Each kernel in a fresh process (the choice is made once): the
    AVX-512 kernel's two ways to a weight byte's float (ANEE_FAST_NIBBLE_FORM; on a CPU without
    AVX-512 both run the AVX2 kernel) and the AVX2 kernel."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kernel == "avx2":
        env["ANEE_FAST_CPU_ISA"] = "avx2"
    else:
        env["ANEE_FAST_NIBBLE_FORM"] = kernel
    done = subprocess.run([sys.executable, "-c", ROUNDING_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout) <= 32


QUANTIZED_DIGEST = """
import hashlib
import torch
from anee_fast.ops.backends import ops_for
from anee_fast.ops import reference as ref
from anee_fast.ops.weight_formats import QUANTIZED, quantize
ops = ops_for("native")
g = torch.Generator().manual_seed(1)
digest = hashlib.sha256()
for fmt in QUANTIZED:
    for K in ((83, 4800) if fmt == "int8" else (96, 4800)):    # 4800: rows past a scale group
        w = quantize(torch.randn(300, K, generator=g) / 10, fmt)
        for rows in (1, 3, 9):
            x = torch.randn(rows, K, generator=g)
            out = ops.linear(x, w)
            torch.testing.assert_close(out, ref.linear(x, w), atol=1e-4, rtol=1e-4)
            digest.update(out.numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("isa", ["best", "avx2"])
def test_native_linear_prefetch_changes_no_value(isa):
    """Weight rows asked for ahead (ANEE_FAST_PREFETCH bytes; by default on Intel CPUs only) give
    bit for bit the results without, also when the bytes ahead lie far past the weight (a prefetch
    never faults), on the AVX-512 and the AVX2 kernels, at one and several rows of x and rows
    longer than a scale group."""
    digests = set()
    for ahead in ("0", "3072", str(1 << 26)):
        env = dict(os.environ, ANEE_FAST_PREFETCH=ahead, OMP_NUM_THREADS="1")
        if isa != "best":
            env["ANEE_FAST_CPU_ISA"] = isa
        done = subprocess.run([sys.executable, "-c", QUANTIZED_DIGEST], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        digests.add(done.stdout.strip())
    assert len(digests) == 1


def test_native_linear_nibble_forms_give_the_same_bits():
    """The AVX-512 one-row 4-bit kernel's two ways to a weight byte's float (ANEE_FAST_NIBBLE_FORM;
    cpu_common.h: nibble_form) round the same products once each: bit for bit the same outputs for
    every quantized format at one and several rows of x (on a CPU without AVX-512 both run the
    AVX2 kernel)."""
    digests = set()
    for form in ("exponent", "convert"):
        env = dict(os.environ, ANEE_FAST_NIBBLE_FORM=form, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", QUANTIZED_DIGEST], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        digests.add(done.stdout.strip())
    assert len(digests) == 1


ONE_4BIT_CALL = ("import torch; from anee_fast.ops.backends import ops_for; from anee_fast.ops.weight_formats "
                 "import quantize; ops_for('native').linear(torch.randn(1, 64), quantize(torch.randn(8, 64), 'q4_1'))")


def test_native_nibble_form_setting_rejects_an_unknown_form():
    env = dict(os.environ, ANEE_FAST_NIBBLE_FORM="fast")
    done = subprocess.run([sys.executable, "-c", ONE_4BIT_CALL], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "ANEE_FAST_NIBBLE_FORM must be 'exponent' or 'convert', got 'fast'" in done.stderr


@pytest.mark.parametrize("value", ["-1", "3k", "1.5"])
def test_native_prefetch_setting_rejects_what_is_not_a_byte_count(value):
    env = dict(os.environ, ANEE_FAST_PREFETCH=value)
    done = subprocess.run([sys.executable, "-c", ONE_4BIT_CALL], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert f"ANEE_FAST_PREFETCH must be a number of bytes >= 0, got '{value}'" in done.stderr


def test_native_linear_rejects_bad_quantized_weights():
    """The raw op (what native.py passes: the uint8 rows and the format's name) checks the rows'
    bytes, the dtype, in_features against the block size and the format's name."""
    op = torch.ops.anee_fast.linear
    ops_for("native")               # loads the library
    x = torch.randn(3, 64)
    good = quantize(torch.randn(5, 64), "q4_1").data
    assert op(x, good, None, "none", None, None, "q4_1").shape == (3, 5)
    with pytest.raises(RuntimeError, match=r"must be uint8 \[5, 40\] with contiguous rows"):
        op(x, torch.zeros(5, 41, dtype=torch.uint8), None, "none", None, None, "q4_1")   # row bytes
    with pytest.raises(RuntimeError, match="must be uint8"):
        op(x, good.view(torch.int8), None, "none", None, None, "q4_1")
    with pytest.raises(RuntimeError, match="must be uint8"):
        op(x, torch.randn(5, 40), None, "none", None, None, "q4_0")
    with pytest.raises(RuntimeError, match="must be uint8"):
        op(x, good.t().contiguous().t(), None, "none", None, None, "q4_1")            # column-major
    with pytest.raises(RuntimeError, match="divisible by 32"):
        op(torch.randn(3, 83), torch.zeros(5, 36, dtype=torch.uint8), None, "none", None, None, "q4_1")
    with pytest.raises(RuntimeError, match="weight_format must be dense, int8, q4_0, q4_1 or q8_0"):
        op(x, good, None, "none", None, None, "q5_k")
    with pytest.raises(RuntimeError, match="must be floating"):                      # bytes as dense
        op(torch.randn(3, 40), good, None, "none", None, None, "dense")
    with pytest.raises(RuntimeError, match=r"must be uint8 \[5, 20\]"):      # x: 32 features
        ops_for("native").linear(torch.randn(3, 32), QuantizedWeight(good, "q4_1", 64))
