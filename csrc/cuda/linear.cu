// CUDA implementation of anee_fast::linear: activation(x @ weight^T + bias), rows masked by
// row_mask, (+ residual), see ops/reference.py:linear.
//
// A decode step's MLP projections are GEMVs (a few rows of x against a whole weight matrix,
// read once from memory) with an epilogue: the activation after the first, the residual add
// after the second, and (in the masked layer loop) the row mask after the out and down
// projections. Up to kGemvRows rows with an epilogue, gemv_kernel does the product and the
// epilogue (bias, GELU-tanh or gated SiLU, row mask, residual add) in one launch, where cuBLAS + separate
// epilogue ops take two, and a decode step on a GPU is bound by its launches. One warp per
// output column (for gated SiLU: its gate and up rows), 16-byte loads of the weight row, float32
// accumulation; every step of the epilogue rounds to the tensors' dtype as separate ops would.
// Everything else (no epilogue, or more rows) is at::linear (cuBLAS), then the epilogue as ATen
// ops (linear_epilogue.h). python/bench_kernels.py --ops linear,linear_down times both.
#include <c10/core/DispatchKeySet.h>  // needed by linear_ops.h
#include <ATen/ops/linear_ops.h>

#include <cmath>

#include "../linear_epilogue.h"
#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int64_t kGemvRows = 8;     // rows of x up to which gemv_kernel runs
constexpr int kGemvWarps = 8;        // warps (output columns) per block

__device__ __forceinline__ float gelu_tanh(float v) {
  const float kBeta = 0.7978845608028654f;   // sqrt(2 / pi)
  const float kKappa = 0.044715f;
  return 0.5f * v * (1.f + tanhf(kBeta * (v + kKappa * v * v * v)));
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

struct GemvParams {
  int64_t M, K, n_out;               // rows of x, in features, output columns
  int64_t ldx, ldw, ldr, ldo;        // row strides of x, weight, residual, out
  Activation act;
  bool vector_loads;                 // 16-byte loads: rows aligned and K a multiple of the width
};

// acc[m] += x[m, k..] . w[k..] over this lane's share of the K dim.
template <typename scalar_t, int MB>
__device__ __forceinline__ void dot_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                         const GemvParams& p, int lane, float (&acc)[MB]) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (p.vector_loads) {
    for (int64_t k = lane * kVec; k < p.K; k += kWarp * kVec) {
      const uint4 w_raw = *reinterpret_cast<const uint4*>(w + k);
      const scalar_t* wv = reinterpret_cast<const scalar_t*>(&w_raw);
      for (int m = 0; m < MB; ++m) {
        if (m >= p.M) break;
        const uint4 x_raw = *reinterpret_cast<const uint4*>(x + m * p.ldx + k);
        const scalar_t* xv = reinterpret_cast<const scalar_t*>(&x_raw);
        for (int i = 0; i < kVec; ++i) acc[m] += static_cast<float>(xv[i]) * static_cast<float>(wv[i]);
      }
    }
  } else {
    for (int64_t k = lane; k < p.K; k += kWarp) {
      const float wk = static_cast<float>(w[k]);
      for (int m = 0; m < MB; ++m) {
        if (m >= p.M) break;
        acc[m] += static_cast<float>(x[m * p.ldx + k]) * wk;
      }
    }
  }
  for (int m = 0; m < MB; ++m) acc[m] = warp_sum(acc[m]);
}

// Block: kGemvWarps output columns; warp: column `col` for all M (<= MB) rows of x.
template <typename scalar_t, int MB>
__global__ void gemv_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                            const scalar_t* __restrict__ bias, const scalar_t* __restrict__ residual,
                            const bool* __restrict__ row_mask, scalar_t* __restrict__ out,
                            GemvParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
  if (col >= p.n_out) return;                       // the whole warp
  const bool gated = p.act == Activation::kSiluGated;
  float y[MB], up[MB];
  for (int m = 0; m < MB; ++m) y[m] = up[m] = 0.f;
  dot_rows<scalar_t, MB>(x, w + col * p.ldw, p, lane, y);
  if (gated) dot_rows<scalar_t, MB>(x, w + (col + p.n_out) * p.ldw, p, lane, up);

  // Lane m writes row m: the product rounded, then each epilogue step rounded in turn.
  for (int m = 0; m < MB; ++m) {
    if (m >= p.M || lane != m) continue;
    scalar_t v = static_cast<scalar_t>(y[m] + (bias ? static_cast<float>(bias[col]) : 0.f));
    if (gated) {
      const scalar_t u = static_cast<scalar_t>(up[m] + (bias ? static_cast<float>(bias[col + p.n_out]) : 0.f));
      const scalar_t s = static_cast<scalar_t>(silu(static_cast<float>(v)));
      v = static_cast<scalar_t>(static_cast<float>(s) * static_cast<float>(u));
    } else if (p.act == Activation::kGeluTanh) {
      v = static_cast<scalar_t>(gelu_tanh(static_cast<float>(v)));
    }
    if (row_mask && !row_mask[m]) v = static_cast<scalar_t>(0.f);   // a select: NaN stays out
    if (residual) v = static_cast<scalar_t>(static_cast<float>(residual[m * p.ldr + col]) + static_cast<float>(v));
    out[m * p.ldo + col] = v;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename scalar_t>
void launch_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                 const at::Tensor& residual, const at::Tensor& row_mask, at::Tensor& out,
                 GemvParams p) {
  const int64_t es = sizeof(scalar_t);
  p.vector_loads = aligned16(x.data_ptr()) && aligned16(w.data_ptr()) && p.K % (16 / es) == 0 &&
                   (p.ldx * es) % 16 == 0 && (p.ldw * es) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((p.n_out + kGemvWarps - 1) / kGemvWarps));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  const scalar_t* r = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
  const bool* mask = row_mask.defined() ? row_mask.data_ptr<bool>() : nullptr;
#define ANEE_FAST_GEMV(MB)                                                                   \
  gemv_kernel<scalar_t, MB><<<grid, kGemvWarps * kWarp, 0, stream>>>(                        \
      x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b, r, mask, out.data_ptr<scalar_t>(), p)
  if (p.M <= 1) ANEE_FAST_GEMV(1);
  else if (p.M <= 2) ANEE_FAST_GEMV(2);
  else if (p.M <= 4) ANEE_FAST_GEMV(4);
  else ANEE_FAST_GEMV(8);
#undef ANEE_FAST_GEMV
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, c10::string_view activation,
                  const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& row_mask) {
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device() &&
              (!bias.has_value() || bias->device() == x.device()) &&
              (!residual.has_value() || residual->device() == x.device()) &&
              (!row_mask.has_value() || row_mask->device() == x.device()),
              "linear: CUDA implementation called with tensors on other devices");
  const LinearSizes sizes = check_linear_args(x, weight, bias, activation, residual, row_mask);
  const bool epilogue = sizes.act != Activation::kNone || residual.has_value() || row_mask.has_value();
  if (!epilogue || sizes.M > kGemvRows || sizes.M == 0 || sizes.K == 0 || sizes.N_out == 0)
    return linear_epilogue(at::_ops::linear::call(x, weight, bias), sizes.act, residual, row_mask);

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.reshape({sizes.M, sizes.K}).contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->reshape({sizes.M, sizes.N_out}).contiguous()
                                            : at::Tensor();
  const at::Tensor mask = row_mask.has_value() ? row_mask->reshape({sizes.M}).contiguous() : at::Tensor();
  at::Tensor out = x.new_empty({sizes.M, sizes.N_out});
  GemvParams p{};
  p.M = sizes.M;
  p.K = sizes.K;
  p.n_out = sizes.N_out;
  p.ldx = xc.stride(0);
  p.ldw = w.stride(0);
  p.ldr = r.defined() ? r.stride(0) : 0;
  p.ldo = out.stride(0);
  p.act = sizes.act;
  ANEE_FAST_DISPATCH_FLOATS(x.scalar_type(), "anee_fast_linear_cuda", [&] {
    launch_gemv<scalar_t>(xc, w, b, r, mask, out, p);
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = sizes.N_out;
  return out.view(shape);
}

}  // namespace anee_fast::cuda
