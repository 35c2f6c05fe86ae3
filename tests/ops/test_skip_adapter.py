"""skip_adapter (norm -> down -> up + bias -> residual add on the row_mask rows, h bit for bit on
the others) of every compiled backend against the reference (see op_cases)."""
import pytest
import torch

from anee_fast.ops import reference as ref
from anee_fast.ops.backends import ops_for
from op_cases import TARGETS, target, target_id  # noqa: F401

EPS = 1e-5
# (rms, norm_bias) of each norm
NORMS = {"rms": (True, False), "layernorm": (False, False), "layernorm+bias": (False, True)}
# Other dtypes: native's CPU GEMVs read bfloat16 and float16 weights; float16 on a GPU.
HALF_TARGETS = [("native", "cpu", torch.bfloat16), ("native", "cpu", torch.float16)] + [
    pytest.param((backend, "cuda", torch.float16), marks=pytest.mark.cuda,
                 id=f"{backend}-cuda-float16")
    for backend in ("triton", "native")]
# Triton's interpreter is slow at model widths: native on the CPU, every backend on a GPU.
COMPILED_TARGETS = [t for t in TARGETS if t != ("triton", "cpu", torch.float32)]


def adapter_inputs(rows, hidden, rank, norm_bias, up_bias, gen):
    """h and a layer's input norm and adapter, scaled so that every term of the output counts."""
    return dict(h=2 * torch.randn(rows, hidden, generator=gen),
                norm_weight=1 + 0.2 * torch.randn(hidden, generator=gen),
                norm_bias=0.2 * torch.randn(hidden, generator=gen) if norm_bias else None,
                down_weight=torch.randn(rank, hidden, generator=gen) / hidden ** 0.5,
                up_weight=torch.randn(hidden, rank, generator=gen) / rank ** 0.5,
                up_bias=0.3 * torch.randn(hidden, generator=gen) if up_bias else None)


def row_mask(kind, rows):
    """all, none, or mixed: rows 1, 4, 7, ... without the adapter."""
    if kind == "all":
        return torch.ones(rows, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(rows, dtype=torch.bool)
    return torch.arange(rows) % 3 != 1


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run(target, args, keep, rms):
    """(the target's output, the float32 reference on the same rounded inputs). The allocator is
    first handed back a NaN-filled block of the output's size, so that a kernel relying on a
    zeroed output shows."""
    torch.full(args["h"].shape, float("nan"), device=target.device, dtype=target.dtype)
    got = target.ops.skip_adapter(**{k: target.to(v) for k, v in args.items()},
                                  row_mask=target.to(keep), eps=EPS, rms=rms)
    expect = ref.skip_adapter(**{k: target.exact(v) for k, v in args.items()},
                              row_mask=target.to(keep), eps=EPS, rms=rms)
    return got, expect


def check(target, got, expect, h, keep, equal_nan=False):
    """The rows without the adapter are h's bits; the others the reference's, to the dtype's
    tolerance."""
    assert got.dtype == target.dtype and got.shape == h.shape
    on, h = target.to(keep), target.to(h)
    assert torch.equal(bits(got[~on]), bits(h[~on])), "a row without the adapter changed"
    torch.testing.assert_close(got.float(), expect, equal_nan=equal_nan, **target.tol)


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("up_bias", [False, True])
@pytest.mark.parametrize("mask", ["all", "none", "mixed"])
def test_skip_adapter(target, rows, norm, up_bias, mask):
    rms, norm_bias = NORMS[norm]
    g = torch.Generator().manual_seed(rows * 13 + len(norm) + up_bias)
    args = adapter_inputs(rows, 67, 5, norm_bias, up_bias, g)
    keep = row_mask(mask, rows)
    got, expect = run(target, args, keep, rms)
    check(target, got, expect, args["h"], keep)


# The interpreter warns of inf * 0 in a tile's lanes that are never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("rows", [3, 40])
def test_skip_adapter_rows_without_it_keep_their_bits(target, rows):
    """Adapter weights that blow up (inf in down_weight, NaN in up_bias): the rows with the
    adapter get the reference's inf and NaN, the others h's own bits, where h is finite and where
    it holds -0.0, inf or NaN."""
    g = torch.Generator().manual_seed(rows)
    args = adapter_inputs(rows, 67, 5, True, True, g)
    args["down_weight"][2, 7] = float("inf")
    args["up_bias"][11] = float("nan")
    args["h"][1, :3] = torch.tensor([-0.0, float("inf"), float("nan")])
    keep = row_mask("mixed", rows)
    got, expect = run(target, args, keep, False)
    on = expect[target.to(keep)]
    assert on.isinf().any() and on.isnan().any()
    check(target, got, expect, args["h"], keep, equal_nan=True)


@pytest.mark.parametrize("target", HALF_TARGETS, indirect=True, ids=target_id)
@pytest.mark.parametrize("rows,mask", [(1, "all"), (3, "mixed"), (17, "mixed"), (17, "all")])
@pytest.mark.parametrize("norm", ["rms", "layernorm+bias"])
def test_skip_adapter_half_precision(target, rows, mask, norm):
    rms, norm_bias = NORMS[norm]
    g = torch.Generator().manual_seed(rows + len(norm))
    args = adapter_inputs(rows, 67, 5, norm_bias, True, g)
    keep = row_mask(mask, rows)
    got, expect = run(target, args, keep, rms)
    check(target, got, expect, args["h"], keep)


@pytest.mark.parametrize("target", COMPILED_TARGETS, indirect=True, ids=target_id)
@pytest.mark.parametrize("rows,active,hidden,rank", [
    (1, 1, 576, 128), (8, 8, 576, 128), (9, 9, 576, 128),   # SmolLM2-like; CUDA kernel: <= 8 rows
    (24, 16, 576, 128), (24, 17, 2048, 64),                  # native CPU GEMVs: <= 16 rows
    (2, 2, 12300, 16)])                                      # wider than the CUDA kernel's smem
def test_skip_adapter_model_sizes(target, rows, active, hidden, rank):
    g = torch.Generator().manual_seed(rows + active + hidden)
    args = adapter_inputs(rows, hidden, rank, False, True, g)
    keep = torch.zeros(rows, dtype=torch.bool)
    keep[torch.randperm(rows, generator=g)[:active]] = True
    got, expect = run(target, args, keep, True)
    check(target, got, expect, args["h"], keep)


# (what is misshapen, the message names)
MISSHAPEN = {
    "1-D h": (dict(h=(67,)), r"h must be \[N, hidden\]"),
    "stacked norm_weight": (dict(norm_weight=(1, 67)), "norm_weight"),
    "short norm_bias": (dict(norm_bias=(66,)), "norm_bias"),
    "down_weight of another width": (dict(down_weight=(5, 66)), "down_weight"),
    "transposed up_weight": (dict(up_weight=(5, 67)), "up_weight"),
    "short up_bias": (dict(up_bias=(66,)), "up_bias"),
    "short row_mask": (dict(row_mask=(2,)), "row_mask must be bool"),
}


@pytest.mark.parametrize("case", list(MISSHAPEN))
def test_skip_adapter_refuses_misshapen_inputs(target, case):
    """An error naming the tensor, never a broadcast or a read past the end."""
    shapes, match = MISSHAPEN[case]
    args = adapter_inputs(3, 67, 5, True, True, torch.Generator().manual_seed(5))
    args = {k: target.to(v) for k, v in args.items()}
    args["row_mask"] = target.to(torch.ones(3, dtype=torch.bool))
    for name, shape in shapes.items():
        args[name] = torch.ones(shape, device=target.device,
                                dtype=torch.bool if name == "row_mask" else target.dtype)
    with pytest.raises((RuntimeError, ValueError), match=match):
        target.ops.skip_adapter(**args, eps=EPS, rms=False)


def test_skip_adapter_refuses_a_mask_that_is_not_bool(target):
    args = {k: target.to(v) for k, v in adapter_inputs(3, 67, 5, False, False,
                                                        torch.Generator().manual_seed(6)).items()}
    with pytest.raises((RuntimeError, ValueError), match="row_mask must be bool"):
        target.ops.skip_adapter(**args, row_mask=target.to(torch.ones(3, dtype=torch.uint8)),
                                eps=EPS, rms=True)


def test_native_skip_adapter_refuses_weights_of_another_dtype():
    args = adapter_inputs(3, 67, 5, False, True, torch.Generator().manual_seed(7))
    args["up_weight"] = args["up_weight"].double()
    with pytest.raises(RuntimeError, match="must have h's dtype"):
        ops_for("native").skip_adapter(**args, row_mask=torch.ones(3, dtype=torch.bool), eps=EPS,
                                       rms=True)


def test_native_skip_adapter_float64():
    """float64 (no GEMV of its own on the CPU): at::linear on the rows with the adapter."""
    args = adapter_inputs(5, 67, 5, True, True, torch.Generator().manual_seed(8))
    args = {k: v.double() for k, v in args.items()}
    keep = row_mask("mixed", 5)
    got = ops_for("native").skip_adapter(**args, row_mask=keep, eps=EPS, rms=False)
    assert got.dtype == torch.float64 and torch.equal(got[~keep], args["h"][~keep])
    torch.testing.assert_close(got, ref.skip_adapter(**args, row_mask=keep, eps=EPS, rms=False),
                               atol=1e-5, rtol=1e-5)        # the norm is float32 in both
