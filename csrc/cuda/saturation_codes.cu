// CUDA implementation of anee_fast::saturation_codes: the saturation heuristic's proposal for
// every token (csrc/policy_rule.h; see ops/reference.py:saturation_codes), one launch where
// PyTorch takes about twenty. One block per row: each thread sums its share of the row (whether
// h and h_prev differ, and the float32 sums of the cosine), the block reduces, thread 0 writes.

#include <ATen/ops/empty.h>

#include "../op_checks.h"
#include "../ops.h"
#include "../policy_rule.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void saturation_codes_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ h_prev,
                                        const float* __restrict__ budget_left, int8_t* __restrict__ codes,
                                        int64_t H, float skip_saturation, float exit_saturation,
                                        float exit_threshold) {
  __shared__ float scratch[kWarp];
  const int64_t n = blockIdx.x;
  const scalar_t* x = h + n * H;
  const scalar_t* y = h_prev + n * H;
  float w11 = 0.f, w22 = 0.f, w12 = 0.f;
  int moved = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float u = static_cast<float>(x[i]), v = static_cast<float>(y[i]);
    moved |= u != v;
    w11 += u * u;
    w22 += v * v;
    w12 += u * v;
  }
  moved = __syncthreads_or(moved);
  w11 = block_sum(w11, scratch);
  w22 = block_sum(w22, scratch);
  w12 = block_sum(w12, scratch);
  if (threadIdx.x == 0)
    codes[n] = saturation_rule(moved != 0, w11, w22, w12, budget_left[n], skip_saturation,
                               exit_saturation, exit_threshold);
}

}  // namespace

at::Tensor saturation_codes(const at::Tensor& h, const at::Tensor& h_prev,
                            const at::Tensor& budget_left, double skip_saturation,
                            double exit_saturation, double exit_threshold) {
  TORCH_CHECK(h.is_cuda(), "saturation_codes: CUDA implementation called with a ", h.device(),
              " tensor h");
  check_cuda(h_prev, h, "saturation_codes", "h_prev");
  check_cuda(budget_left, h, "saturation_codes", "budget_left");
  const int64_t N = check_saturation_codes_args(h, h_prev, budget_left);
  TORCH_CHECK(N <= INT32_MAX, "saturation_codes: too many rows for one launch");
  at::Tensor codes = at::empty({N}, h.options().dtype(at::kChar));
  if (N == 0) return codes;
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hc = h.contiguous(), pc = h_prev.contiguous(), left = budget_left.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(h.scalar_type(), "anee_fast_saturation_codes_cuda", [&] {
    saturation_codes_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        hc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), left.data_ptr<float>(),
        codes.data_ptr<int8_t>(), h.size(1), static_cast<float>(skip_saturation),
        static_cast<float>(exit_saturation), static_cast<float>(exit_threshold));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return codes;
}

}  // namespace anee_fast::cuda
