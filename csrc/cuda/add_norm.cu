// CUDA implementation of anee_fast::add_norm: s = x + residual (stored in x's dtype), then
// RMSNorm / LayerNorm of s in float32 (see ops/reference.py:add_norm). One block per row: the
// block writes s, synchronises, and normalises the s it wrote (the same values the unfused
// add + norm would read).

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void add_norm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                const float* __restrict__ w, const float* __restrict__ b,
                                scalar_t* __restrict__ sum, scalar_t* __restrict__ out, int64_t D,
                                float eps, bool rms) {
  __shared__ float scratch[kWarp];
  const int64_t row = blockIdx.x;
  scalar_t* sr = sum + row * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    sr[i] = static_cast<scalar_t>(static_cast<float>(x[row * D + i]) +
                                  static_cast<float>(r[row * D + i]));
  __syncthreads();   // the whole row of s is written before any thread reads it back
  float mean, rstd;
  block_row_stats(static_cast<const scalar_t*>(sr), D, eps, rms, scratch, &mean, &rstd);
  scalar_t* outr = out + row * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float y = (static_cast<float>(sr[i]) - mean) * rstd * w[i];
    if (b != nullptr) y += b[i];
    outr[i] = static_cast<scalar_t>(y);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_norm(const at::Tensor& x, const at::Tensor& residual,
                                            const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, double eps,
                                            bool rms) {
  TORCH_CHECK(x.is_cuda(), "add_norm: CUDA implementation called with a ", x.device(), " tensor x");
  const int64_t D = check_add_norm_args(x, residual, weight, bias);
  check_cuda(residual, x, "add_norm", "residual");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor w = float_tensor(weight, x, "add_norm", "weight");
  const at::Tensor b = bias.has_value() ? float_tensor(*bias, x, "add_norm", "bias") : at::Tensor();
  at::Tensor sum = x.new_empty(x.sizes()), out = x.new_empty(x.sizes());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (rows == 0) return {sum, out};
  TORCH_CHECK(rows <= INT32_MAX, "add_norm: ", rows, " rows is more than one launch handles");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(x.scalar_type(), "anee_fast_add_norm_cuda", [&] {
    add_norm_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), w.data_ptr<float>(),
        b.defined() ? b.data_ptr<float>() : nullptr, sum.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), D, static_cast<float>(eps), rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum, out};
}

}  // namespace anee_fast::cuda
