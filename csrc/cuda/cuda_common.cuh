// Helpers shared by the CUDA implementations of the anee_fast ops (csrc/cuda/*.cu): input checks,
// device-side index copies, the weight formats' dispatch (decoders: weight_formats.cuh), and
// float32 warp/block reductions. Every kernel computes in float32 and stores in the tensors' own
// dtype (float, c10::Half or c10::BFloat16).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "../op_checks.h"
#include "weight_formats.cuh"

namespace anee_fast::cuda {

// Dispatches over the three float dtypes the ops accept (scalar_t inside the lambda).
#define ANEE_FAST_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

inline void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              like.device(), " (all tensors of one call must be on the same CUDA device)");
}

// An int64 contiguous copy of an index tensor on the GPU (slot mappings, positions, block
// tables, ...). The conversion runs on the device: no host synchronisation.
inline at::Tensor index_tensor(const at::Tensor& t, const at::Tensor& like, const char* op,
                               const char* name) {
  check_cuda(t, like, op, name);
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()), op, ": ", name, " must be an integer tensor, got ",
              t.scalar_type());
  return t.to(at::kLong).contiguous();
}

// A float32 contiguous copy (norm weights, biases, inv_freq), on the device.
inline at::Tensor float_tensor(const at::Tensor& t, const at::Tensor& like, const char* op,
                               const char* name) {
  check_cuda(t, like, op, name);
  return t.to(at::kFloat).contiguous();
}

// The activation dtypes of the kernels that read a weight through weight_formats.cuh (float64
// takes the ATen paths).
inline bool is_weight_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Calls fn(Rows()) with the weight_formats.cuh decoder of a quantized format.
template <typename Fn>
void with_quantized_rows(WeightFormat f, Fn&& fn) {
  switch (f) {
    case WeightFormat::kInt8: fn(Int8Rows()); return;
    case WeightFormat::kQ8_0: fn(Q8_0Rows()); return;
    case WeightFormat::kQ4_0: fn(Q4_0Rows()); return;
    case WeightFormat::kQ4_1: fn(Q4_1Rows()); return;
    default: TORCH_CHECK(false, "anee_fast: not a quantized weight format");
  }
}

// A weight as the kernels read it: rows with unit column stride; a GGUF format's float16 scales
// 2-byte aligned (an odd start or row stride, from a view of unusual bytes, takes a copy).
inline at::Tensor weight_for_kernels(const at::Tensor& weight, WeightFormat format) {
  if (format == WeightFormat::kDense) return weight.stride(1) == 1 ? weight : weight.contiguous();
  const bool odd = ((reinterpret_cast<uintptr_t>(weight.data_ptr()) | weight.stride(0)) & 1) != 0;
  if (format != WeightFormat::kInt8 && odd) return weight.clone(at::MemoryFormat::Contiguous);
  return weight;
}

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums each of the N values v[0..N) over the warp's lanes (N a power of two, at most kWarp) in
// N - 1 + log2(kWarp / N) shuffles, where N warp_sums take 5 N: each halving step sends half of a
// lane's values to its partner (lane ^ offset) and adds the partner's copy of the half it keeps
// (the upper half where the lane has the offset's bit). Returns, in every lane l, the total of
// value l / (kWarp / N): the lanes l with l % (kWarp / N) == 0 hold one value each, in order.
template <int N>
__device__ __forceinline__ float warp_sum_many(float (&v)[N]) {
  static_assert(N >= 1 && N <= kWarp && (N & (N - 1)) == 0, "warp_sum_many: N a power of two <= 32");
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int offset = kWarp / 2, n = N; offset > 0; offset /= 2) {
    if (n > 1) {
      n /= 2;
      const bool upper = (lane & offset) != 0;
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        if (i < n) {
          const float send = upper ? v[i] : v[i + n];
          const float keep = upper ? v[i + n] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
        }
      }
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
    }
  }
  return v[0];
}

// Sum of v over the whole block, returned to every thread. `scratch` holds >= 32 floats; the
// leading __syncthreads makes it safe to call again right after a previous call.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// Normalisation statistics of one row x[0..D) computed by the whole block (the same values in
// every thread): mean (0 for RMSNorm) and 1 / sqrt(var + eps), LayerNorm with the centred
// variance like torch.
template <typename scalar_t>
__device__ __forceinline__ void block_row_stats(const scalar_t* x, int64_t D, float eps, bool rms,
                                                float* scratch, float* mean, float* rstd) {
  if (rms) {
    float s = 0.f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const float v = static_cast<float>(x[i]);
      s += v * v;
    }
    *mean = 0.f;
    *rstd = rsqrtf(block_sum(s, scratch) / static_cast<float>(D) + eps);
  } else {
    float s = 0.f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) s += static_cast<float>(x[i]);
    const float mu = block_sum(s, scratch) / static_cast<float>(D);
    float var = 0.f;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      const float c = static_cast<float>(x[i]) - mu;
      var += c * c;
    }
    *mean = mu;
    *rstd = rsqrtf(block_sum(var, scratch) / static_cast<float>(D) + eps);
  }
}

// norm(x) of one row x[0..D) into shared memory xs[0..D), computed by the whole block and
// rounded to scalar_t as the reference's norm returns (the SKIP path's input: skip_kv and
// skip_adapter project it); xs is complete for every thread on return.
template <typename scalar_t>
__device__ __forceinline__ void block_normed_row(const scalar_t* x, int64_t D, float eps, bool rms,
                                                 const float* norm_w, const float* norm_b,
                                                 float* scratch, float* xs) {
  float mean, rstd;
  block_row_stats(x, D, eps, rms, scratch, &mean, &rstd);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float v = (static_cast<float>(x[i]) - mean) * rstd * norm_w[i];
    if (norm_b != nullptr) v += norm_b[i];
    xs[i] = static_cast<float>(static_cast<scalar_t>(v));
  }
  __syncthreads();
}

}  // namespace anee_fast::cuda
