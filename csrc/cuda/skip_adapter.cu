// CUDA implementation of anee_fast::skip_adapter, the SKIP path's low-rank correction of the rows
// h [N, hidden]: out = h + up_weight (down_weight norm(h)) + up_bias where row_mask holds, h bit
// for bit on the other rows (see ops/reference.py:skip_adapter). Each step rounds to h's dtype,
// as the reference's separate ops do. down_weight [rank, hidden] and up_weight [hidden, rank] are
// float tensors of h's dtype or both quantized rows in weight_format (ops/weight_formats.py).
//
// Up to kGemmRows rows, skip_adapter_kernel: one block per row. A row without the adapter is
// copied; on the others the block runs two phases: norm(h) into shared memory and
// z = norm(h) down^T into a shared buffer of rank values, then out = h + z up^T + up_bias. Each
// weight row is a dot product of a group of G lanes (a power of two, at most a warp: as many as
// the row has units of work, elements for a float weight, slices of 8 values for a quantized one,
// dequantized in registers by weight_formats.cuh), so a warp takes 32 / G rows at a time and the
// short rows of up (rank values) keep every lane busy; a quantized row's float32 values are
// exactly weight_formats.dequantize's. The mask is read on the device: no host sync, one launch
// whatever the mask (CUDA-graph capturable). More rows would re-read the weights once per block,
// so they run as norm (the norm op's kernel) -> two products (the linear op: cuBLAS for a float
// weight, for a quantized one its GEMV up to 8 rows and dequantize + cuBLAS past them) -> a where
// that keeps h's bits on the other rows; so does a row too wide for the kernel's shared memory
// (hidden + rank past about 12K) and a quantized adapter under float64 h (linear's path for it).

#include <ATen/ops/empty_like.h>
#include <ATen/ops/where.h>

#include <type_traits>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"
#include "weight_formats.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 256;
// More rows than this: norm -> linear -> where. Not measured yet (no GPU when it was written);
// linear's fused GEMV serves up to 8 rows too.
constexpr int64_t kGemmRows = 8;
// The normalised row and z (dynamic shared memory) next to the static scratch: together within
// the default 48 KB per block.
constexpr size_t kMaxSharedBytes = 48 * 1024 - kWarp * sizeof(float);

struct Params {
  int64_t hidden, rank;
  int64_t ld_down, ld_up;            // row strides of the weights in bytes (their rows contiguous)
  int64_t zs_offset;                 // z's place in shared memory (floats): hidden rounded up to 4
  int g_down, g_up;                  // lanes per row of down and of up (powers of two, <= kWarp)
  float eps;
  bool rms;
};

// Lanes per weight row of `units` units of work (elements, or slices of 8 values): the power of
// two at least `units`, at most a warp.
int lanes_per_row(int64_t units) {
  int g = 1;
  while (g < kWarp && g < units) g *= 2;
  return g;
}

// v . row over the units g, g + G, g + 2G, ... of the row (K values), this lane's part of the
// dot product. A float row of h's dtype (Rows = DenseRows<scalar_t>) one element a unit, a
// quantized one a slice of 8 values (weight_formats.cuh). v: shared memory, 16-byte aligned.
template <typename scalar_t, typename Rows>
__device__ __forceinline__ float dot_part(const uint8_t* row, const float* v, int64_t K, int g,
                                          int G) {
  float s = 0.f;
  if constexpr (std::is_same_v<Rows, DenseRows<scalar_t>>) {
    const scalar_t* w = reinterpret_cast<const scalar_t*>(row);
    for (int64_t i = g; i < K; i += G) s += v[i] * static_cast<float>(w[i]);
  } else {
    const typename Rows::Row r = Rows::row(row);
    const int64_t slices = (K + kSliceValues - 1) / kSliceValues;
    for (int64_t sl = g; sl < slices; sl += G) {
      float w[kSliceValues];
      Rows::slice(r, sl, K, w);
      const int64_t k0 = sl * kSliceValues;
      if (k0 + kSliceValues <= K) {                   // two float4 loads of v
        const float4 a = *reinterpret_cast<const float4*>(v + k0);
        const float4 b = *reinterpret_cast<const float4*>(v + k0 + 4);
        s += a.x * w[0] + a.y * w[1] + a.z * w[2] + a.w * w[3] + b.x * w[4] + b.y * w[5] +
             b.z * w[6] + b.w * w[7];
      } else {                                        // an int8 row's last, partial slice
#pragma unroll
        for (int j = 0; j < kSliceValues; ++j)
          if (k0 + j < K) s += v[k0 + j] * w[j];
      }
    }
  }
  return s;
}

// Sum of v over each aligned group of G lanes (G a power of two <= kWarp), returned to every lane
// of the group; the whole warp must call it. G = kWarp is warp_sum, step for step.
__device__ __forceinline__ float group_sum(float v, int G) {
  for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename Rows>
__global__ void skip_adapter_kernel(const scalar_t* __restrict__ h,
                                    const float* __restrict__ norm_w,
                                    const float* __restrict__ norm_b,
                                    const uint8_t* __restrict__ down,
                                    const uint8_t* __restrict__ up,
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
  extern __shared__ float4 shared_raw[];   // float4: 16-byte aligned for dot_part's loads
  float* shared = reinterpret_cast<float*>(shared_raw);
  float* xs = shared;                      // norm(h) [hidden]
  float* zs = shared + p.zs_offset;        // norm(h) down^T [rank], 16-byte aligned too
  __shared__ float scratch[kWarp];

  // Phase 1: the norm, then z, each rounded to the tensors' dtype as the reference's ops return.
  // Down row k is the dot product of lanes g = 0 .. G - 1 of a group; a warp takes 32 / G rows
  // per step (the loop bound is the same for the whole warp: every lane reaches group_sum).
  block_normed_row(hr, p.hidden, p.eps, p.rms, norm_w, norm_b, scratch, xs);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  {
    const int G = p.g_down, per_warp = kWarp / G, g = lane % G;
    for (int64_t k0 = static_cast<int64_t>(warp) * per_warp; k0 < p.rank;
         k0 += static_cast<int64_t>(warps) * per_warp) {
      const int64_t k = k0 + lane / G;
      float s = k < p.rank ? dot_part<scalar_t, Rows>(down + k * p.ld_down, xs, p.hidden, g, G)
                           : 0.f;
      s = group_sum(s, G);
      if (g == 0 && k < p.rank) zs[k] = static_cast<float>(static_cast<scalar_t>(s));
    }
  }
  __syncthreads();

  // Phase 2: y = z up^T + up_bias (rounded), out = h + y; up row j likewise by a group of lanes.
  {
    const int G = p.g_up, per_warp = kWarp / G, g = lane % G;
    for (int64_t j0 = static_cast<int64_t>(warp) * per_warp; j0 < p.hidden;
         j0 += static_cast<int64_t>(warps) * per_warp) {
      const int64_t j = j0 + lane / G;
      float s = j < p.hidden ? dot_part<scalar_t, Rows>(up + j * p.ld_up, zs, p.rank, g, G) : 0.f;
      s = group_sum(s, G);
      if (g == 0 && j < p.hidden) {
        if (up_b != nullptr) s += static_cast<float>(up_b[j]);
        const scalar_t y = static_cast<scalar_t>(s);
        outr[j] = static_cast<scalar_t>(static_cast<float>(hr[j]) + static_cast<float>(y));
      }
    }
  }
}

}  // namespace

at::Tensor skip_adapter(const at::Tensor& h, const at::Tensor& norm_weight,
                        const std::optional<at::Tensor>& norm_bias, const at::Tensor& down_weight,
                        const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                        const at::Tensor& row_mask, double eps, bool rms,
                        c10::string_view weight_format) {
  TORCH_CHECK(h.is_cuda(), "skip_adapter: CUDA implementation called with a ", h.device(),
              " tensor h");
  check_cuda(norm_weight, h, "skip_adapter", "norm_weight");
  if (norm_bias.has_value()) check_cuda(*norm_bias, h, "skip_adapter", "norm_bias");
  check_cuda(down_weight, h, "skip_adapter", "down_weight");
  check_cuda(up_weight, h, "skip_adapter", "up_weight");
  if (up_bias.has_value()) check_cuda(*up_bias, h, "skip_adapter", "up_bias");
  const SkipAdapterSizes sizes = check_skip_adapter_args(h, norm_weight, norm_bias, down_weight,
                                                         up_weight, up_bias, row_mask,
                                                         weight_format);
  const int64_t N = sizes.N, hidden = sizes.hidden, rank = sizes.rank;
  const WeightFormat format = sizes.format;
  const bool quantized = format != WeightFormat::kDense;

  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hc = h.contiguous();
  const at::Tensor mask = row_mask.contiguous();
  const int64_t zs_offset = (hidden + 3) / 4 * 4;
  const size_t shared_bytes = sizeof(float) * (zs_offset + rank);
  // The kernel reads a float weight of h's dtype (any float dtype), or a quantized one under
  // float32, bfloat16 or float16 h.
  if (N > kGemmRows || shared_bytes > kMaxSharedBytes ||
      (quantized && !is_weight_kernel_dtype(h.scalar_type()))) {
    const at::Tensor z = anee_fast::cuda::linear(norm(hc, norm_weight, norm_bias, eps, rms),
                                                 down_weight, std::nullopt, "none", std::nullopt,
                                                 std::nullopt, weight_format);
    const at::Tensor y = anee_fast::cuda::linear(z, up_weight, up_bias, "none", std::nullopt,
                                                 std::nullopt, weight_format);
    return at::where(mask.unsqueeze(-1), hc.add(y), hc);
  }
  at::Tensor out = at::empty_like(hc);
  if (N == 0) return out;

  const at::Tensor nw = float_tensor(norm_weight, h, "skip_adapter", "norm_weight");
  const at::Tensor nb = norm_bias.has_value()
                            ? float_tensor(*norm_bias, h, "skip_adapter", "norm_bias")
                            : at::Tensor();
  // Rows with unit column stride; a GGUF format's rows 2-byte aligned (weight_formats.cuh).
  const at::Tensor down = weight_for_kernels(down_weight, format);
  const at::Tensor up = weight_for_kernels(up_weight, format);
  const at::Tensor ub = up_bias.has_value() ? up_bias->contiguous() : at::Tensor();
  Params p{};
  p.hidden = hidden;
  p.rank = rank;
  p.ld_down = down.stride(0) * down.element_size();
  p.ld_up = up.stride(0) * up.element_size();
  p.zs_offset = zs_offset;
  // Units of work per row: elements of a float row, slices of 8 values of a quantized one.
  const auto units = [&](int64_t K) { return quantized ? (K + kSliceValues - 1) / kSliceValues : K; };
  p.g_down = lanes_per_row(units(hidden));
  p.g_up = lanes_per_row(units(rank));
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  const uint8_t* dp = static_cast<const uint8_t*>(down.data_ptr());
  const uint8_t* upp = static_cast<const uint8_t*>(up.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(h.scalar_type(), "anee_fast_skip_adapter_cuda", [&] {
    auto launch = [&](auto rows) {
      skip_adapter_kernel<scalar_t, decltype(rows)>
          <<<static_cast<unsigned>(N), kThreads, shared_bytes, stream>>>(
              hc.data_ptr<scalar_t>(), nw.data_ptr<float>(),
              nb.defined() ? nb.data_ptr<float>() : nullptr, dp, upp,
              ub.defined() ? ub.data_ptr<scalar_t>() : nullptr, mask.data_ptr<bool>(),
              out.data_ptr<scalar_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!quantized) {
      launch(DenseRows<scalar_t>());
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      with_quantized_rows(format, launch);
    } else {
      TORCH_CHECK(false, "skip_adapter: a quantized adapter under float64 h takes linear's path");
    }
  });
  return out;
}

}  // namespace anee_fast::cuda
