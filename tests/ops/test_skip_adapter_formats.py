"""skip_adapter with quantized adapter weights (ops/weight_formats.py: int8, q8_0, q4_0, q4_1; down
and up in one format) in every compiled backend against the reference (see op_cases), float32
and bfloat16 h: rows with the adapter to the dtype's tolerance, the others h bit for bit.

up_weight's in_features is the rank, so the block formats need a rank that is a multiple of 32;
int8 takes any (40 here: a partial last block of 32). Hidden sizes are odd multiples of 32 (96,
544: SmolLM2's 576 is an even one). Rows 1, 3 and 8 take the Triton kernel's one launch (it
dequantizes in registers), 9 its path past the kernel's rows (dequantized weights, float32
products).
"""
import pytest
import torch

from anee_fast.ops import reference as ref
from anee_fast.ops.weight_formats import QUANTIZED, QuantizedWeight, quantize
from op_cases import TARGETS, target, target_id  # noqa: F401

EPS = 1e-5
# (rms, norm_bias) of each norm
NORMS = {"rms": (True, False), "layernorm": (False, False), "layernorm+bias": (False, True)}
# TARGETS (CPU: float32; CUDA: float32 and bfloat16) and bfloat16 h on the CPU.
FORMAT_TARGETS = TARGETS + [("triton", "cpu", torch.bfloat16), ("native", "cpu", torch.bfloat16)]
# Triton's interpreter rounds float32 to bfloat16 toward zero (a GPU to nearest): each of the
# op's roundings may be off by a whole unit in the last place, and in one direction, so its
# bfloat16 results are held to twice the dtype's tolerance.
INTERPRETED_BF16_TOL = dict(atol=6e-2, rtol=4e-2)


def tolerance(target):
    interpreted = target.device.type == "cpu" and target.ops.__name__ == "anee_fast.kernels"
    return INTERPRETED_BF16_TOL if interpreted and target.dtype == torch.bfloat16 else target.tol


def adapter_inputs(rows, hidden, rank, fmt, norm_bias, up_bias, gen):
    """h, a layer's input norm and an adapter quantized to `fmt`, scaled so that every term of the
    output counts."""
    return dict(h=2 * torch.randn(rows, hidden, generator=gen),
                norm_weight=1 + 0.2 * torch.randn(hidden, generator=gen),
                norm_bias=0.2 * torch.randn(hidden, generator=gen) if norm_bias else None,
                down_weight=quantize(torch.randn(rank, hidden, generator=gen) / hidden ** 0.5, fmt),
                up_weight=quantize(torch.randn(hidden, rank, generator=gen) / rank ** 0.5, fmt),
                up_bias=0.3 * torch.randn(hidden, generator=gen) if up_bias else None)


def mixed_mask(rows):
    """Rows 1, 4, 7, ... without the adapter."""
    return torch.arange(rows) % 3 != 1


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def place(target, t, exact=False):
    """A test input on the target: quantized weights as they are, float tensors in its dtype (the
    float32 of that, for the reference, when `exact`)."""
    if isinstance(t, QuantizedWeight):
        return t.to(target.device)
    return target.exact(t) if exact else target.to(t)


def run_and_check(target, args, keep, rms, equal_nan=False):
    """The target's output against the float32 reference on the same rounded inputs: the rows
    without the adapter are h's bits, the others the reference's to the dtype's tolerance. The
    allocator is first handed back a NaN-filled block of the output's size, so that a kernel
    relying on a zeroed output shows."""
    torch.full(args["h"].shape, float("nan"), device=target.device, dtype=target.dtype)
    on = target.to(keep)
    got = target.ops.skip_adapter(**{k: place(target, v) for k, v in args.items()}, row_mask=on,
                                  eps=EPS, rms=rms)
    expect = ref.skip_adapter(**{k: place(target, v, exact=True) for k, v in args.items()},
                              row_mask=on, eps=EPS, rms=rms)
    h = target.to(args["h"])
    assert got.dtype == target.dtype and got.shape == h.shape
    assert torch.equal(bits(got[~on]), bits(h[~on])), "a row without the adapter changed"
    torch.testing.assert_close(got.float(), expect, equal_nan=equal_nan, **tolerance(target))
    return got


@pytest.mark.parametrize("target", FORMAT_TARGETS, indirect=True, ids=target_id)
@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("up_bias", [False, True])
def test_skip_adapter_quantized(target, fmt, rows, norm, up_bias):
    rms, norm_bias = NORMS[norm]
    rank = (32, 64)[(rows + up_bias) % 2]
    g = torch.Generator().manual_seed(rows * 13 + len(norm) + up_bias + QUANTIZED.index(fmt))
    args = adapter_inputs(rows, 96, rank, fmt, norm_bias, up_bias, g)
    run_and_check(target, args, mixed_mask(rows), rms)


SIZES = [
    (1, 544, 64, "rms"),                  # SmolLM2-like decode, one row
    (8, 544, 32, "layernorm+bias"),       # the kernel's last row count
    (9, 544, 64, "rms"),                  # past it
    (3, 96, 40, "layernorm"),             # int8 only: a rank that is no multiple of 32
    (8, 160, 96, "rms")]                  # a rank that is no power of two
# The block formats need up_weight's in_features (the rank) divisible by 32.
FORMAT_SIZES = [(fmt, *size) for fmt in QUANTIZED for size in SIZES
                if fmt == "int8" or size[2] % 32 == 0]


@pytest.mark.parametrize("target", FORMAT_TARGETS, indirect=True, ids=target_id)
@pytest.mark.parametrize("fmt,rows,hidden,rank,norm", FORMAT_SIZES)
def test_skip_adapter_quantized_sizes(target, fmt, rows, hidden, rank, norm):
    rms, norm_bias = NORMS[norm]
    g = torch.Generator().manual_seed(rows + hidden + rank)
    args = adapter_inputs(rows, hidden, rank, fmt, norm_bias, True, g)
    run_and_check(target, args, mixed_mask(rows), rms)


@pytest.mark.parametrize("target", FORMAT_TARGETS, indirect=True, ids=target_id)
@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("rows,mask", [(3, "all"), (3, "none"), (9, "none")])
def test_skip_adapter_quantized_whole_masks(target, fmt, rows, mask):
    """Every row with the adapter, or none (the output is then h, bit for bit)."""
    g = torch.Generator().manual_seed(rows + len(mask))
    args = adapter_inputs(rows, 96, 32, fmt, True, True, g)
    keep = torch.full((rows,), mask == "all", dtype=torch.bool)
    run_and_check(target, args, keep, False)


# The interpreter warns of inf * 0 in a tile's lanes that are never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("target", FORMAT_TARGETS, indirect=True, ids=target_id)
@pytest.mark.parametrize("fmt", ["q8_0", "int8"])
@pytest.mark.parametrize("rows", [3, 9])
def test_skip_adapter_quantized_rows_without_it_keep_their_bits(target, fmt, rows):
    """A row without the adapter whose h holds -0.0, inf and NaN keeps those bits, next to rows
    with it; a NaN up_bias element reaches the rows with the adapter."""
    g = torch.Generator().manual_seed(rows + 100)
    args = adapter_inputs(rows, 96, 32, fmt, True, True, g)
    args["h"][1, :3] = torch.tensor([-0.0, float("inf"), float("nan")])
    args["up_bias"][11] = float("nan")
    got = run_and_check(target, args, mixed_mask(rows), False, equal_nan=True)
    assert got[0, 11].isnan() and not got[1, 11].isnan()


@pytest.mark.parametrize("down,up", [("q8_0", "q4_0"), ("int8", "q8_0"), ("dense", "q4_1"),
                                     ("q4_1", "dense")])
def test_skip_adapter_refuses_two_formats(target, down, up):
    g = torch.Generator().manual_seed(9)
    args = {k: place(target, v) for k, v in adapter_inputs(3, 96, 32, "int8", False, True, g).items()}
    for name, fmt in (("down_weight", down), ("up_weight", up)):
        w = torch.randn(args[name].shape, generator=g)
        args[name] = target.to(w) if fmt == "dense" else quantize(w, fmt).to(target.device)
    with pytest.raises((RuntimeError, ValueError), match="must have one format"):
        target.ops.skip_adapter(**args, row_mask=target.to(torch.ones(3, dtype=torch.bool)),
                                eps=EPS, rms=True)


# (which weight, its shape [rows, in_features]) where hidden is 96 and rank 32 (down_weight's
# rows): rows of another width hold the wrong number of bytes for the adapter's.
MISSHAPEN = {"down_weight of another width": ("down_weight", (32, 128)),
             "up_weight of another rank": ("up_weight", (96, 64)),
             "transposed up_weight": ("up_weight", (32, 96))}


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("case", list(MISSHAPEN))
def test_skip_adapter_refuses_quantized_weights_of_another_shape(target, fmt, case):
    """An error naming the weight, never a read past its rows' bytes."""
    name, shape = MISSHAPEN[case]
    g = torch.Generator().manual_seed(10)
    args = adapter_inputs(3, 96, 32, fmt, False, True, g)
    args[name] = quantize(torch.randn(shape, generator=g), fmt)
    args = {k: place(target, v) for k, v in args.items()}
    with pytest.raises((RuntimeError, ValueError), match=name):
        target.ops.skip_adapter(**args, row_mask=target.to(torch.ones(3, dtype=torch.bool)),
                                eps=EPS, rms=True)
