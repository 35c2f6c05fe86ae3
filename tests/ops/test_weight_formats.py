"""ops/weight_formats.py: the stored layouts mean what GGUF's own reader says they mean, our
quantizers round to nearest within each format's step, and row slices are views."""
import numpy as np
import pytest
import torch

from anee_fast.ops.weight_formats import (QUANTIZED, QuantizedWeight, dequantize, dequantize_rows,
                                          quantize, row_bytes)

gguf = pytest.importorskip("gguf")
GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_blocks_dequantize_as_gguf_reads_them(fmt):
    """Random bytes with finite float16 scales: our dequantize equals gguf-py's, bit for bit."""
    g = torch.Generator().manual_seed(len(fmt))
    rows, K = 7, 160
    data = torch.randint(0, 256, (rows, row_bytes(fmt, K)), dtype=torch.uint8, generator=g)
    blocks = data.view(rows, K // 32, -1)
    scales = 2 if fmt == "q4_1" else 1
    blocks[..., :2 * scales] = (torch.randn(rows, K // 32, scales, generator=g) / 8).half() \
        .view(torch.uint8).reshape(rows, K // 32, 2 * scales)
    kind = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[fmt])
    expect = gguf.quants.dequantize(data.numpy(), kind)
    assert np.array_equal(dequantize(QuantizedWeight(data, fmt, K)).numpy(), expect)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_quantize_rounds_within_a_step(fmt):
    g = torch.Generator().manual_seed(3)
    K = 83 if fmt == "int8" else 96
    w = torch.randn(9, K, generator=g)
    q = quantize(w, fmt)
    assert q.data.dtype == torch.uint8 and q.shape == w.shape and q.nbytes == 9 * row_bytes(fmt, K)
    err = (dequantize(q) - w).abs()
    groups = w.reshape(9, -1) if fmt == "int8" else w.reshape(9, -1, 32)
    top = groups.abs().amax(-1, keepdim=True)
    # Half a step; q4_0's 16 levels are asymmetric (-8d .. 7d): a whole step at the clamped end.
    bound = {"int8": top / 254, "q8_0": top / 254, "q4_0": top / 8,
             "q4_1": (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 30}[fmt]
    assert bool((err.reshape(groups.shape) <= bound * 1.01 + 1e-3).all())


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_row_slices_and_row_lookups_are_the_same_values(fmt):
    K = 83 if fmt == "int8" else 64
    q = quantize(torch.randn(6, K), fmt)
    full = dequantize(q)
    view = q[2:3]                               # one row at an odd byte offset for int8
    assert view.data.data_ptr() == q.data[2:].data_ptr()
    assert torch.equal(dequantize(view), full[2:3])
    assert torch.equal(dequantize_rows(q, torch.tensor([5, 0, 5])), full[[5, 0, 5]])


def test_bad_weights_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize(torch.randn(2, 40), "q4_1")
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(torch.randn(2, 64), "q3_k")
    with pytest.raises(ValueError, match=r"uint8 \[rows, 40\]"):
        QuantizedWeight(torch.zeros(2, 41, dtype=torch.uint8), "q4_1", 64)
    with pytest.raises(TypeError, match="slice of rows"):
        quantize(torch.randn(2, 64), "q8_0")[0]
