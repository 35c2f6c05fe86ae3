// CUDA implementation of anee_fast::norm: RMSNorm (rms=true) or LayerNorm over the last dim,
// computed in float32, returned in x's dtype (see ops/reference.py:norm). One block per row.

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void norm_kernel(const scalar_t* __restrict__ x, const float* __restrict__ w,
                            const float* __restrict__ b, scalar_t* __restrict__ out, int64_t D,
                            float eps, bool rms) {
  __shared__ float scratch[kWarp];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * D;
  scalar_t* outr = out + row * D;
  float mean, rstd;
  block_row_stats(xr, D, eps, rms, scratch, &mean, &rstd);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float y = (static_cast<float>(xr[i]) - mean) * rstd * w[i];
    if (b != nullptr) y += b[i];
    outr[i] = static_cast<scalar_t>(y);
  }
}

}  // namespace

at::Tensor norm(const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, double eps, bool rms) {
  TORCH_CHECK(x.is_cuda(), "norm: CUDA implementation called with a ", x.device(), " tensor x");
  const int64_t D = check_norm_args(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = float_tensor(weight, x, "norm", "weight");
  const at::Tensor b = bias.has_value() ? float_tensor(*bias, x, "norm", "bias") : at::Tensor();
  at::Tensor out = x.new_empty(x.sizes());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (rows == 0) return out;
  TORCH_CHECK(rows <= INT32_MAX, "norm: ", rows, " rows is more than one launch handles");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(x.scalar_type(), "anee_fast_norm_cuda", [&] {
    norm_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
        out.data_ptr<scalar_t>(), D, static_cast<float>(eps), rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace anee_fast::cuda
