// CUDA implementation of anee_fast::skip_adapter, the SKIP path's low-rank correction of the rows
// h [N, hidden]: out = h + up_weight (down_weight norm(h)) + up_bias where row_mask holds, h bit
// for bit on the other rows (see ops/reference.py:skip_adapter). Each step rounds to h's dtype,
// as the reference's separate ops do.
//
// Up to kGemmRows rows, skip_adapter_kernel: one block per row. A row without the adapter is
// copied; on the others the block runs two phases: norm(h) into shared memory and
// z = norm(h) down^T into a shared buffer of rank values (a warp per value), then
// out = h + z up^T + up_bias (a warp per output feature). The mask is read on the device: no host
// sync, one launch whatever the mask (CUDA-graph capturable). More rows would re-read the
// weights once per block, so they run as norm (the norm op's kernel) -> two GEMMs (cuBLAS
// through at::linear) -> a where that keeps h's bits on the other rows; so does a row too wide
// for the kernel's shared memory (hidden + rank past about 12K).

#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/where.h>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 256;
// More rows than this: norm -> cuBLAS -> where. Not measured yet (no GPU when it was written);
// linear's fused GEMV serves up to 8 rows too.
constexpr int64_t kGemmRows = 8;
// The normalised row and z (dynamic shared memory) next to the static scratch: together within
// the default 48 KB per block.
constexpr size_t kMaxSharedBytes = 48 * 1024 - kWarp * sizeof(float);

struct Params {
  int64_t hidden, rank;
  int64_t ld_down, ld_up;            // row strides of the weights (their last dim is contiguous)
  float eps;
  bool rms;
};

template <typename scalar_t>
__global__ void skip_adapter_kernel(const scalar_t* __restrict__ h,
                                    const float* __restrict__ norm_w,
                                    const float* __restrict__ norm_b,
                                    const scalar_t* __restrict__ down,
                                    const scalar_t* __restrict__ up,
                                    const scalar_t* __restrict__ up_b,
                                    const bool* __restrict__ row_mask, scalar_t* __restrict__ out,
                                    Params p) {
  const int64_t n = blockIdx.x;
  const scalar_t* hr = h + n * p.hidden;
  scalar_t* outr = out + n * p.hidden;
  if (!row_mask[n]) {               // a whole-block decision, taken before any barrier
    for (int64_t i = threadIdx.x; i < p.hidden; i += blockDim.x) outr[i] = hr[i];
    return;
  }
  extern __shared__ float shared[];
  float* xs = shared;               // norm(h) [hidden]
  float* zs = shared + p.hidden;    // norm(h) down^T [rank]
  __shared__ float scratch[kWarp];

  // Phase 1: the norm, then z, each rounded to the tensors' dtype as the reference's ops return.
  block_normed_row(hr, p.hidden, p.eps, p.rms, norm_w, norm_b, scratch, xs);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int64_t k = warp; k < p.rank; k += warps) {
    const scalar_t* w = down + k * p.ld_down;
    float s = 0.f;
    for (int64_t i = lane; i < p.hidden; i += kWarp) s += xs[i] * static_cast<float>(w[i]);
    s = warp_sum(s);
    if (lane == 0) zs[k] = static_cast<float>(static_cast<scalar_t>(s));
  }
  __syncthreads();

  // Phase 2: y = z up^T + up_bias (rounded), out = h + y.
  for (int64_t j = warp; j < p.hidden; j += warps) {
    const scalar_t* w = up + j * p.ld_up;
    float s = 0.f;
    for (int64_t r = lane; r < p.rank; r += kWarp) s += zs[r] * static_cast<float>(w[r]);
    s = warp_sum(s);
    if (lane == 0) {
      if (up_b != nullptr) s += static_cast<float>(up_b[j]);
      const scalar_t y = static_cast<scalar_t>(s);
      outr[j] = static_cast<scalar_t>(static_cast<float>(hr[j]) + static_cast<float>(y));
    }
  }
}

}  // namespace

at::Tensor skip_adapter(const at::Tensor& h, const at::Tensor& norm_weight,
                        const std::optional<at::Tensor>& norm_bias, const at::Tensor& down_weight,
                        const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                        const at::Tensor& row_mask, double eps, bool rms) {
  TORCH_CHECK(h.is_cuda(), "skip_adapter: CUDA implementation called with a ", h.device(),
              " tensor h");
  check_cuda(norm_weight, h, "skip_adapter", "norm_weight");
  if (norm_bias.has_value()) check_cuda(*norm_bias, h, "skip_adapter", "norm_bias");
  check_cuda(down_weight, h, "skip_adapter", "down_weight");
  check_cuda(up_weight, h, "skip_adapter", "up_weight");
  if (up_bias.has_value()) check_cuda(*up_bias, h, "skip_adapter", "up_bias");
  const SkipAdapterSizes sizes = check_skip_adapter_args(h, norm_weight, norm_bias, down_weight,
                                                         up_weight, up_bias, row_mask);
  const int64_t N = sizes.N, hidden = sizes.hidden, rank = sizes.rank;

  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hc = h.contiguous();
  const at::Tensor mask = row_mask.contiguous();
  const size_t shared_bytes = sizeof(float) * (hidden + rank);
  if (N > kGemmRows || shared_bytes > kMaxSharedBytes) {
    const at::Tensor z = at::linear(norm(hc, norm_weight, norm_bias, eps, rms), down_weight);
    return at::where(mask.unsqueeze(-1), hc.add(at::linear(z, up_weight, up_bias)), hc);
  }
  at::Tensor out = at::empty_like(hc);
  if (N == 0) return out;

  const at::Tensor nw = float_tensor(norm_weight, h, "skip_adapter", "norm_weight");
  const at::Tensor nb = norm_bias.has_value()
                            ? float_tensor(*norm_bias, h, "skip_adapter", "norm_bias")
                            : at::Tensor();
  const at::Tensor down = down_weight.stride(1) == 1 ? down_weight : down_weight.contiguous();
  const at::Tensor up = up_weight.stride(1) == 1 ? up_weight : up_weight.contiguous();
  const at::Tensor ub = up_bias.has_value() ? up_bias->contiguous() : at::Tensor();
  Params p{};
  p.hidden = hidden;
  p.rank = rank;
  p.ld_down = down.stride(0);
  p.ld_up = up.stride(0);
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(h.scalar_type(), "anee_fast_skip_adapter_cuda", [&] {
    skip_adapter_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, shared_bytes, stream>>>(
        hc.data_ptr<scalar_t>(), nw.data_ptr<float>(),
        nb.defined() ? nb.data_ptr<float>() : nullptr, down.data_ptr<scalar_t>(),
        up.data_ptr<scalar_t>(), ub.defined() ? ub.data_ptr<scalar_t>() : nullptr,
        mask.data_ptr<bool>(), out.data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace anee_fast::cuda
