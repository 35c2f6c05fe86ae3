"""linear (GEMM / GEMV with its epilogues and row mask) of every compiled backend against the
reference (see op_cases)."""
import pytest
import torch

from anee_fast.ops import reference as ref
from anee_fast.ops.backends import ops_for
from op_cases import target  # noqa: F401  (fixture)


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
