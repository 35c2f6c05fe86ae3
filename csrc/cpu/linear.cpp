// CPU implementation of anee_fast::linear: activation(x @ weight^T + bias), rows masked by
// row_mask, (+ residual), see ops/reference.py:linear. The epilogue runs as ATen ops (linear_epilogue.h): on the CPU a launch
// costs little, the product is what counts.
//
// Why an own kernel: a decode step multiplies a few rows by every weight matrix, so it is a
// GEMV that streams the weights once from DRAM. torch's CPU GEMM reached 9-16 GB/s on such
// calls on the 2-core development machine, where a plain read streams at about 25 GB/s;
// gemv (cpu_common.h) reads each weight row once for up to kMaxRows rows of x, with four rows of
// the weight in flight per thread (AVX2 + FMA). Larger row counts (prefill, big batches) are
// GEMMs and go to at::linear, as do other dtypes and CPUs without AVX2.
#include <c10/core/DispatchKeySet.h>  // needed by linear_ops.h
#include <ATen/ops/linear_ops.h>

#include "../linear_epilogue.h"
#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {
namespace {

// Rows of x up to which the kernel beats at::linear (python/bench_kernels.py --ops linear).
constexpr int64_t kMaxRows = 16;

// x @ weight^T + bias.
at::Tensor product(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const LinearSizes& sizes) {
  const int64_t M = sizes.M, K = sizes.K, N = sizes.N;
  if (M > kMaxRows || x.scalar_type() != at::kFloat || !has_avx2_fma() || K == 0)
    return at::_ops::linear::call(x, weight, bias);

  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const int64_t ldw = w.stride(0);
  at::Tensor out = x.new_empty({M, N});
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  gemv(xp, M, K, wp, ldw, N, yp);
  if (bias.has_value()) out.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.view(shape);
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, c10::string_view activation,
                  const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& row_mask) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() &&
              (!bias.has_value() || bias->device().is_cpu()) &&
              (!residual.has_value() || residual->device().is_cpu()) &&
              (!row_mask.has_value() || row_mask->device().is_cpu()),
              "linear: CPU implementation called with non-CPU tensors");
  const LinearSizes sizes = check_linear_args(x, weight, bias, activation, residual, row_mask);
  return linear_epilogue(product(x, weight, bias, sizes), sizes.act, residual, row_mask);
}

}  // namespace anee_fast::cpu
