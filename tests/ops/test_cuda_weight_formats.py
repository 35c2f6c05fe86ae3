"""The CUDA kernels' reading of quantized weights (csrc/cuda/weight_formats.cuh) against
weight_formats.dequantize, bit for bit, with no GPU.

Its decoders are __host__ __device__ and plain C++ but for a few intrinsics (loads, bit casts,
un-fused multiply and add), so nvcc compiles them into a small host program here: it decodes every
slice of every row (the kernels' unit of work) of random bytes, which hit float16 scales of every
kind (subnormal, inf, NaN) and every nibble, with the rows placed at every start alignment the
kernels meet (any byte for int8, even ones for the GGUF blocks) and odd K (int8's partial last
slice). Bytes around the rows are garbage, so a decoder that keeps a byte it should shift away
fails. Skipped, with the reason, where nvcc is not installed; a GPU is not needed.
"""
import os
import shutil
import subprocess

import pytest
import torch

from anee_fast.ops import reference as ref
from anee_fast.ops import weight_formats as wf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

PROGRAM = r"""
#include "weight_formats.cuh"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace anee_fast::cuda;

// Every value of rows [rows, K] stored from `base` with row stride `stride`, through slice().
template <typename Rows>
void decode(const uint8_t* base, long rows, long stride, long K, float* out) {
  const long slices = (K + kSliceValues - 1) / kSliceValues;
  for (long n = 0; n < rows; ++n) {
    const typename Rows::Row r = Rows::row(base + n * stride);
    for (long s = 0; s < slices; ++s) {
      float w[kSliceValues];
      Rows::slice(r, s, K, w);
      for (int j = 0; j < kSliceValues; ++j)
        if (s * kSliceValues + j < K) out[n * K + s * kSliceValues + j] = w[j];
    }
  }
}

// decode FORMAT ROWS K ROW_BYTES OFFSET IN OUT: IN holds the rows back to back; they are placed
// OFFSET bytes past a 16-byte aligned address, between bytes of garbage; OUT gets float32 [ROWS, K].
int main(int argc, char** argv) {
  if (argc != 8) return 2;
  const char* format = argv[1];
  const long rows = atol(argv[2]), K = atol(argv[3]), row_bytes = atol(argv[4]), offset = atol(argv[5]);
  const long size = rows * row_bytes;
  std::vector<uint8_t> buffer(16 + size + 32);          // operator new: 16-byte aligned
  for (size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<uint8_t>(0xA5 ^ (i * 29));
  uint8_t* base = buffer.data() + offset;
  FILE* in = fopen(argv[6], "rb");
  if (!in || fread(base, 1, size, in) != static_cast<size_t>(size)) return 3;
  fclose(in);
  std::vector<float> out(rows * K);
  if (!strcmp(format, "int8")) decode<Int8Rows>(base, rows, row_bytes, K, out.data());
  else if (!strcmp(format, "q8_0")) decode<Q8_0Rows>(base, rows, row_bytes, K, out.data());
  else if (!strcmp(format, "q4_0")) decode<Q4_0Rows>(base, rows, row_bytes, K, out.data());
  else if (!strcmp(format, "q4_1")) decode<Q4_1Rows>(base, rows, row_bytes, K, out.data());
  else return 4;
  FILE* o = fopen(argv[7], "wb");
  if (!o || fwrite(out.data(), sizeof(float), out.size(), o) != out.size()) return 5;
  fclose(o);
  return 0;
}
"""


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (os.path.join(cuda_home, "bin", "nvcc"), shutil.which("nvcc")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found ($CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc or on PATH): "
                    "it compiles csrc/cuda/weight_formats.cuh into the host program this test runs")
    work = tmp_path_factory.mktemp("cuda_weight_formats")
    source, program = work / "decode.cu", work / "decode"
    source.write_text(PROGRAM)
    # -ffp-contract=off: the host compiler must not fuse d * q + m either (the device code uses
    # __fmul_rn / __fadd_rn for that).
    result = subprocess.run([nvcc, "-std=c++17", "-O2", "-Xcompiler", "-ffp-contract=off",
                             "-I", CUDA_DIR, str(source), "-o", str(program)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    return program


def _decode(program, tmp_path, data, format, K, offset):
    rows, row_bytes = data.shape
    src, dst = tmp_path / "rows.bin", tmp_path / "values.bin"
    src.write_bytes(data.numpy().tobytes())
    subprocess.run([str(program), format, str(rows), str(K), str(row_bytes), str(offset), str(src),
                    str(dst)], check=True)
    return torch.frombuffer(bytearray(dst.read_bytes()), dtype=torch.float32).reshape(rows, K)


def _assert_bit_equal(got, expect):
    nan = expect.isnan()
    assert torch.equal(got.isnan(), nan), "NaN in different places"
    mismatch = (got.view(torch.int32) != expect.view(torch.int32)) & ~nan
    assert not mismatch.any(), (f"{int(mismatch.sum())} values differ, first at "
                                f"{mismatch.nonzero()[0].tolist()}: got {got[mismatch][0].item()!r}, "
                                f"expected {expect[mismatch][0].item()!r}")


# int8 rows start at any byte (row stride 4 + K); the GGUF blocks at even bytes (18 and 34 are
# 2 mod 4, so consecutive blocks alternate between the two alignments of an even address).
CASES = [("int8", 37, (0, 1, 2, 3)), ("int8", 64, (0, 1, 2, 3)), ("q8_0", 96, (0, 2)),
         ("q4_0", 96, (0, 2)), ("q4_1", 96, (0, 2))]


@pytest.mark.parametrize("format,K,offsets", CASES, ids=[f"{c[0]}-K{c[1]}" for c in CASES])
def test_decode_random_bytes(decoder, tmp_path, format, K, offsets):
    """Random bytes are a valid weight in every format: all scales, NaN and inf included."""
    g = torch.Generator().manual_seed(K + len(format))
    data = torch.randint(0, 256, (7, wf.row_bytes(format, K)), dtype=torch.uint8, generator=g)
    expect = wf.dequantize(wf.QuantizedWeight(data, format, K))
    for offset in offsets:
        _assert_bit_equal(_decode(decoder, tmp_path, data, format, K, offset), expect)


@pytest.mark.parametrize("format", wf.QUANTIZED)
def test_decode_quantized_weight(decoder, tmp_path, format):
    """A weight as quantize() makes it (the values a model holds)."""
    g = torch.Generator().manual_seed(len(format))
    weight = wf.quantize(torch.randn(5, 64, generator=g), format)
    _assert_bit_equal(_decode(decoder, tmp_path, weight.data, format, 64, 2),
                      wf.dequantize(weight))


# ---- the CUDA kernels themselves (marker cuda: make test-gpu) -----------------------------
# wgemv_kernel (rows <= 8, epilogue or not), dequantize_kernel + cuBLAS (more rows) and
# skip_kv_kernel's quantized rows, against the reference on the same device and dtype. Weights:
# row views of a taller stack; K odd for int8 (unaligned rows, a partial last slice) and K past
# the 4 warps x 32 lanes x 8 values a block covers in one step; one GGUF weight at an odd byte
# (the kernels take a copy). "dense" is a float weight of another dtype than x.

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
FORMATS = wf.QUANTIZED + ("dense",)


def _weight(format, out_features, in_features, dtype, device, gen, odd_start=False):
    """A weight [out_features, in_features] in `format`: rows 1.. of a stack one row taller (or,
    odd_start, its bytes from an odd address); "dense": a float tensor of the other dtype."""
    w = torch.randn(out_features + 1, in_features, generator=gen) / in_features ** 0.5
    if format == "dense":
        other = torch.bfloat16 if dtype == torch.float32 else torch.float32
        return w.to(device, other)[1:]
    stack = wf.quantize(w, format).to(device)
    if not odd_start:
        return stack[1:]
    rb = stack.data.shape[1]
    flat = torch.empty(out_features * rb + 1, dtype=torch.uint8, device=device)
    flat[1:] = stack.data[1:].reshape(-1)
    return wf.QuantizedWeight(flat[1:].view(out_features, rb), format, in_features)


def check_linear(ops, device, dtype, format, rows, in_features, activation, with_residual,
                 with_mask, odd_start=False):
    g = torch.Generator().manual_seed(rows * 13 + in_features + len(format) + len(activation))
    out_features = 130                                        # gated: 65 columns
    width = out_features // 2 if activation == "silu_gated" else out_features
    w = _weight(format, out_features, in_features, dtype, device, g, odd_start)
    x = torch.randn(rows, in_features, generator=g).to(device, dtype)
    b = torch.randn(out_features, generator=g).to(device, dtype)
    residual = torch.randn(rows, width, generator=g).to(device, dtype) if with_residual else None
    keep = None
    if with_mask:
        keep = (torch.rand(rows, generator=g) < 0.5).to(device)
        keep[0] = rows > 1
        x = torch.where(keep[:, None], x, torch.nan)          # a masked row's x never counts
    got = ops.linear(x, w, b, activation, residual, keep)
    expect = ref.linear(torch.nan_to_num(x, 0.0), w, b, activation, residual, keep)
    assert got.dtype == dtype and got.shape == (rows, width)
    torch.testing.assert_close(got.float(), expect.float(), **TOL[dtype])


def check_skip_kv(ops, device, dtype, format, rows, hidden, with_q):
    g = torch.Generator().manual_seed(rows * 7 + hidden + len(format))
    kv_heads, heads, d = 2, 4, 64
    kv_rows = 2 * kv_heads * d + (heads * d if with_q else 0)
    w = _weight(format, kv_rows, hidden, dtype, device, g)
    args = dict(h=torch.randn(rows, hidden, generator=g).to(device, dtype),
                norm_weight=(1 + 0.2 * torch.randn(hidden, generator=g)).to(device, dtype),
                norm_bias=None, kv_weight=w,
                kv_bias=(0.1 * torch.randn(kv_rows, generator=g)).to(device, dtype),
                positions=torch.randint(0, 500, (rows,), generator=g).to(device),
                inv_freq=(1.0 / 10000 ** (torch.arange(0, d, 2) / d)).to(device), rope_scale=1.0,
                slot_mapping=slot_mapping_for(rows, 40, g).to(device), eps=1e-5, rms=True)
    results = []
    for fn in (ops.skip_kv, ref.skip_kv):
        k = torch.full((41, kv_heads, d), 7.25, device=device, dtype=dtype)
        v = torch.full((41, kv_heads, d), 7.25, device=device, dtype=dtype)
        q = torch.full((rows, heads, d), torch.nan, device=device, dtype=dtype) if with_q else None
        fn(**args, k_cache=k, v_cache=v, q_out=q)
        results.append((k, v, q))
    (k, v, q), (k_exp, v_exp, q_exp) = results
    written = k_exp != 7.25
    assert written.any() and torch.equal(k[~written], k_exp[~written])
    for got, expect in ((k, k_exp), (v, v_exp)) + (((q, q_exp),) if with_q else ()):
        torch.testing.assert_close(got.float(), expect.float(), **TOL[dtype])


def slot_mapping_for(rows, slots, gen):
    mapping = torch.randperm(slots, generator=gen)[:rows]
    mapping[1::3] = -1                                       # padding rows write nothing
    return mapping


def _native_cuda():
    """The native ops for the `cuda`-marked tests: fails (never skips) without a GPU, as
    op_cases' targets do."""
    assert torch.cuda.is_available(), "a `cuda` test needs a CUDA GPU (run it with -m cuda there)"
    from anee_fast import backends
    status = backends("cuda")["native"]
    assert status is True, f"backend native is not available on cuda: {status}"
    from anee_fast.ops.backends import ops_for
    return ops_for("native")


LINEAR_EPILOGUES = [("none", False, False), ("silu_gated", True, False),
                    ("gelu_tanh", False, True), ("none", True, True)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 40])
@pytest.mark.parametrize("activation,with_residual,with_mask", LINEAR_EPILOGUES)
def test_cuda_linear_weight_formats(dtype, format, rows, activation, with_residual, with_mask):
    ops = _native_cuda()
    for in_features in ((83, 1163) if format in ("int8", "dense") else (96, 1184)):
        check_linear(ops, "cuda", dtype, format, rows, in_features, activation, with_residual,
                     with_mask)


@pytest.mark.cuda
@pytest.mark.parametrize("format", ("q4_0", "q8_0", "q4_1"))
@pytest.mark.parametrize("rows", [3, 40])
def test_cuda_linear_gguf_weight_at_an_odd_address(format, rows):
    check_linear(_native_cuda(), "cuda", torch.float32, format, rows, 96, "silu_gated", True, False,
                 odd_start=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("rows,with_q", [(1, False), (2, True), (5, False), (5, True)])
def test_cuda_skip_kv_weight_formats(dtype, format, rows, with_q):
    ops = _native_cuda()
    for hidden in ((83, 1163) if format in ("int8", "dense") else (96, 1184)):
        check_skip_kv(ops, "cuda", dtype, format, rows, hidden, with_q)
