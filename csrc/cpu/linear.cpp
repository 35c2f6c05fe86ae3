// CPU implementation of anee_fast::linear: activation(x @ weight^T + bias), rows masked by
// row_mask, (+ residual), see ops/reference.py:linear. The epilogue runs as ATen ops
// (linear_epilogue.h): on the CPU a launch costs little, the product is what counts.
//
// Why an own kernel: a decode step multiplies a few rows by every weight matrix, so it is a
// GEMV that streams the weights once from DRAM. torch's CPU GEMM reached 9-16 GB/s on such
// calls on the 2-core development machine, where a plain read streams at about 25 GB/s;
// gemv (cpu_common.h) reads each weight row once for up to kMaxRows rows of x (AVX2 + FMA).
// Quantized weights (weight_formats.py) take weight_gemv.h's kernels, which decode each block in
// registers (AVX-512 where the CPU has it): fewer bytes per weight is what makes decode faster. Larger row counts (prefill, big batches) are GEMMs and go to at::linear,
// a quantized weight dequantized to float32 a chunk of rows at a time; so do CPUs without AVX2.
//
// A weight that is not x's dtype (quantized, or bfloat16 / float16 under float32 x) gives the
// float32 product of x and the float32 weight, rounded to x's dtype once (reference._product).
#include <c10/core/DispatchKeySet.h>  // needed by linear_ops.h
#include <ATen/ops/linear_ops.h>
#include <ATen/ops/zeros.h>

#include "../linear_epilogue.h"
#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"
#include "weight_decode.h"
#include "weight_gemv.h"

namespace anee_fast::cpu {
namespace {

// Rows of x up to which the kernels beat at::linear (python/bench_kernels.py --ops linear).
constexpr int64_t kMaxRows = 16;
// Past kMaxRows a quantized weight is dequantized this many float32 values at a time (a chunk
// of rows stays in L2 while at::linear reads it).
constexpr int64_t kDequantChunk = 1 << 18;

// x @ weight^T + bias for a dense weight of x's dtype.
at::Tensor same_dtype_product(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const LinearSizes& sizes) {
  const int64_t M = sizes.M, K = sizes.K, N = sizes.N;
  if (M > kMaxRows || x.scalar_type() != at::kFloat || !has_avx2_fma() || K == 0)
    return at::_ops::linear::call(x, weight, bias);
  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  at::Tensor out = x.new_empty({M, N});
  gemv(xc.data_ptr<float>(), M, K, w.data_ptr<float>(), w.stride(0), N, out.data_ptr<float>());
  if (bias.has_value()) out.add_(*bias);
  return out;
}

// float32 [M, N] = x (float32 [M, K]) @ weight^T, for a quantized weight past kMaxRows rows:
// chunks of rows dequantized, each multiplied by at::linear.
at::Tensor dequantized_product(const at::Tensor& xf, const at::Tensor& weight, WeightFormat f,
                               int64_t N, int64_t K) {
  at::Tensor out = xf.new_empty({xf.size(0), N});
  const int64_t chunk = std::max<int64_t>(16, kDequantChunk / std::max<int64_t>(K, 1));
  at::Tensor buf = xf.new_empty({std::min(chunk, N), K});
  const uint8_t* w = weight.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; n += chunk) {
    const int64_t rows = std::min(chunk, N - n);
    at::Tensor part = buf.narrow(0, 0, rows);
    dequantize_rows(f, w, weight.stride(0), K, n, n + rows, part.data_ptr<float>(), K);
    out.narrow(1, n, rows).copy_(at::_ops::linear::call(xf, part, std::nullopt));
  }
  return out;
}

// Weights the GEMVs read: quantized, or dense float32 / bfloat16 / float16 (gemv's load8).
bool gemv_dtype(const at::Tensor& weight, WeightFormat f) {
  const at::ScalarType t = weight.scalar_type();
  return f != WeightFormat::kDense || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// x @ weight^T + bias in float32 for a weight that is not x's dtype (quantized, or another
// float dtype), rounded to x's dtype.
at::Tensor float32_product(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const LinearSizes& sizes) {
  const int64_t M = sizes.M, K = sizes.K, N = sizes.N;
  const at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor out;
  if (K == 0) {
    out = at::zeros({M, N}, xf.options());
  } else if (M > kMaxRows || !has_avx2_fma() || M == 0 || !gemv_dtype(weight, sizes.format)) {
    out = sizes.format == WeightFormat::kDense
              ? at::_ops::linear::call(xf, weight.to(at::kFloat), std::nullopt)
              : dequantized_product(xf, weight, sizes.format, N, K);
  } else {
    out = xf.new_empty({M, N});
    const float* xp = xf.data_ptr<float>();
    float* yp = out.data_ptr<float>();
    if (sizes.format != WeightFormat::kDense) {
      quantized_gemv(sizes.format, xp, M, K, weight.data_ptr<uint8_t>(), weight.stride(0), N, yp);
    } else {
      const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
      if (w.scalar_type() == at::kBFloat16) {
        gemv(xp, M, K, w.data_ptr<c10::BFloat16>(), w.stride(0), N, yp);
      } else if (w.scalar_type() == at::kHalf) {
        gemv(xp, M, K, w.data_ptr<c10::Half>(), w.stride(0), N, yp);
      } else {
        gemv(xp, M, K, w.data_ptr<float>(), w.stride(0), N, yp);
      }
    }
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

// x @ weight^T + bias, shaped [..., N].
at::Tensor product(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const LinearSizes& sizes) {
  const bool same = sizes.format == WeightFormat::kDense && weight.scalar_type() == x.scalar_type();
  at::Tensor out = same ? same_dtype_product(x, weight, bias, sizes)
                        : float32_product(x, weight, bias, sizes);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = sizes.N;
  return out.view(shape);
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, c10::string_view activation,
                  const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& row_mask, c10::string_view weight_format) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() &&
              (!bias.has_value() || bias->device().is_cpu()) &&
              (!residual.has_value() || residual->device().is_cpu()) &&
              (!row_mask.has_value() || row_mask->device().is_cpu()),
              "linear: CPU implementation called with non-CPU tensors");
  const LinearSizes sizes =
      check_linear_args(x, weight, bias, activation, residual, row_mask, weight_format);
  return linear_epilogue(product(x, weight, bias, sizes), sizes.act, residual, row_mask);
}

}  // namespace anee_fast::cpu
