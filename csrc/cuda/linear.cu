// CUDA implementation of anee_fast::linear: activation(x @ weight^T + bias), rows masked by
// row_mask, (+ residual), see ops/reference.py:linear; the weight a float tensor or quantized rows
// (weight_format, ops/weight_formats.py).
//
// A decode step's MLP projections are GEMVs (a few rows of x against a whole weight matrix,
// read once from memory) with an epilogue: the activation after the first, the residual add
// after the second, and (in the masked layer loop) the row mask after the out and down
// projections. Up to kGemvRows rows a kernel of ours does the product and the epilogue (bias,
// GELU-tanh or gated SiLU, row mask, residual add) in one launch, where cuBLAS + separate
// epilogue ops take two, and a decode step on a GPU is bound by its launches. Every step of the
// epilogue rounds to the tensors' dtype as separate ops would (epilogue_store).
//  - gemv_kernel, a float weight of x's dtype with an epilogue: one warp per output column (for
//    gated SiLU: its gate and up rows), 16-byte loads of the weight row, float32 accumulation.
//    Without an epilogue, or past kGemvRows rows: at::linear (cuBLAS), then the epilogue as ATen
//    ops (linear_epilogue.h).
//  - wgemv_kernel, a quantized weight (or a float weight of another dtype), epilogue or not:
//    bound by weight bytes (0.56 a value for q4_0, 1.06 for q8_0, ~1 for int8, 2 for bf16), it
//    reads each byte once and dequantizes in registers (weight_formats.cuh), accumulating in
//    float32. A block takes kWRows weight rows and its kWWarps warps split K, so a 2048-row
//    matrix still gives 512 blocks; each x value loaded serves kWRows rows, which keeps the x
//    traffic (from L1) below the weight traffic at 8 rows.
//  - Past kGemvRows rows (a GEMM, bound by arithmetic), a quantized weight is dequantized by
//    dequantize_kernel into x's dtype, in slabs of at most kDequantValues values (an LM head
//    never needs its whole copy at once), and multiplied by cuBLAS; a float weight of another
//    dtype takes the reference's float32 product. Then the epilogue as ATen ops.
// Nothing syncs with the host: the paths depend on shapes, dtypes and the format only, and every
// launch goes to the current stream (CUDA-graph capturable). python/bench_kernels.py --ops
// linear,linear_down times it.
#include <c10/core/DispatchKeySet.h>  // needed by linear_ops.h
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear_ops.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../linear_epilogue.h"
#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"
#include "weight_formats.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int64_t kGemvRows = 8;     // rows of x up to which the GEMV kernels run
constexpr int kGemvWarps = 8;        // gemv_kernel: warps (output columns) per block
constexpr int kWRows = 4;            // wgemv_kernel: weight rows per block (gated: 2 columns)
constexpr int kWWarps = 4;           // wgemv_kernel: warps per block, splitting K
constexpr int64_t kDequantValues = int64_t{1} << 26;   // weight values dequantized at once

__device__ __forceinline__ float gelu_tanh(float v) {
  const float kBeta = 0.7978845608028654f;   // sqrt(2 / pi)
  const float kKappa = 0.044715f;
  return 0.5f * v * (1.f + tanhf(kBeta * (v + kKappa * v * v * v)));
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

struct GemvParams {
  int64_t M, K, n_out;               // rows of x, in features, output columns
  int64_t ldx, ldw, ldr, ldo;        // row strides of x, weight (elements; bytes for wgemv), residual, out
  Activation act;
  bool vector_loads;                 // gemv_kernel: 16-byte loads (rows aligned, K a multiple of the width)
};

// Row m, column col of the output from the float32 products y (and, gated, up): the product
// rounded, then each epilogue step rounded in turn, as the separate ops would.
template <typename scalar_t>
__device__ __forceinline__ void epilogue_store(float y, float up, int64_t m, int64_t col,
                                               const scalar_t* __restrict__ bias,
                                               const scalar_t* __restrict__ residual,
                                               const bool* __restrict__ row_mask,
                                               scalar_t* __restrict__ out, const GemvParams& p) {
  scalar_t v = static_cast<scalar_t>(y + (bias ? static_cast<float>(bias[col]) : 0.f));
  if (p.act == Activation::kSiluGated) {
    const scalar_t u = static_cast<scalar_t>(up + (bias ? static_cast<float>(bias[col + p.n_out]) : 0.f));
    const scalar_t s = static_cast<scalar_t>(silu(static_cast<float>(v)));
    v = static_cast<scalar_t>(static_cast<float>(s) * static_cast<float>(u));
  } else if (p.act == Activation::kGeluTanh) {
    v = static_cast<scalar_t>(gelu_tanh(static_cast<float>(v)));
  }
  if (row_mask && !row_mask[m]) v = static_cast<scalar_t>(0.f);   // a select: NaN stays out
  if (residual) v = static_cast<scalar_t>(static_cast<float>(residual[m * p.ldr + col]) + static_cast<float>(v));
  out[m * p.ldo + col] = v;
}

// ---- gemv_kernel: a float weight of x's dtype --------------------------------------------

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

  // Lane m writes row m.
  for (int m = 0; m < MB; ++m) {
    if (m >= p.M || lane != m) continue;
    epilogue_store(y[m], up[m], m, col, bias, residual, row_mask, out, p);
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

// ---- wgemv_kernel: a quantized weight (or a float one of another dtype) --------------------

// Block: kWRows weight rows (columns col0 .. col0 + 3; gated: gate columns col0, col0 + 1 and
// their up rows) for all M (<= MB) rows of x. Its kWWarps warps split K: lane `lane` of warp
// `warp` takes the slices (8 values, weight_formats.cuh) s = 32 warp + lane + 128 i, so a warp's
// loads of a step cover 256 consecutive values (coalesced), and every x slice loaded is used for
// the block's 4 weight rows. Warp sums (warp_sum_many), then the warps' sums through shared
// memory, then one thread per (row of x, column) does the epilogue.
template <typename scalar_t, typename Rows, int MB>
__global__ void __launch_bounds__(kWWarps * kWarp)
wgemv_kernel(const scalar_t* __restrict__ x, const uint8_t* __restrict__ w,
             const scalar_t* __restrict__ bias, const scalar_t* __restrict__ residual,
             const bool* __restrict__ row_mask, scalar_t* __restrict__ out, GemvParams p) {
  constexpr int kSums = MB * kWRows;                // (row of x, weight row) pairs
  const bool gated = p.act == Activation::kSiluGated;
  const int cols = gated ? kWRows / 2 : kWRows;     // output columns of this block
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * cols;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  // Weight row r: column col0 + r % cols, the up row (+ n_out) for r >= cols when gated.
  // Columns past n_out read the last one (in bounds; their sums are never stored).
  typename Rows::Row rows[kWRows];
#pragma unroll
  for (int r = 0; r < kWRows; ++r) {
    const int64_t col = std::min<int64_t>(col0 + r % cols, p.n_out - 1);
    rows[r] = Rows::row(w + (col + (r / cols) * p.n_out) * p.ldw);
  }

  float acc[MB][kWRows];
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int r = 0; r < kWRows; ++r) acc[m][r] = 0.f;

  const int64_t slices = (p.K + kSliceValues - 1) / kSliceValues;
  for (int64_t s = warp * kWarp + lane; s < slices; s += kWWarps * kWarp) {
    float wv[kWRows][kSliceValues];
#pragma unroll
    for (int r = 0; r < kWRows; ++r) Rows::slice(rows[r], s, p.K, wv[r]);
    const int64_t k0 = s * kSliceValues;
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m >= p.M) break;
      float xv[kSliceValues];
      load8_floats(x + m * p.ldx + k0, p.K - k0, xv);
#pragma unroll
      for (int r = 0; r < kWRows; ++r)
#pragma unroll
        for (int i = 0; i < kSliceValues; ++i) acc[m][r] += xv[i] * wv[r][i];
    }
  }

  float sums[kSums];
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int r = 0; r < kWRows; ++r) sums[m * kWRows + r] = acc[m][r];
  warp_sum_many(sums);
  constexpr int kLanesPerSum = kWarp / kSums;
  __shared__ float partial[kWWarps][kSums];
  if (lane % kLanesPerSum == 0) partial[warp][lane / kLanesPerSum] = sums[0];
  __syncthreads();

  const int t = threadIdx.x;
  if (t >= MB * cols) return;
  const int m = t / cols, c = t % cols;
  const int64_t col = col0 + c;
  if (m >= p.M || col >= p.n_out) return;
  float y = 0.f, up = 0.f;
#pragma unroll
  for (int v = 0; v < kWWarps; ++v) {
    y += partial[v][m * kWRows + c];
    if (gated) up += partial[v][m * kWRows + c + cols];
  }
  epilogue_store(y, up, m, col, bias, residual, row_mask, out, p);
}

template <typename scalar_t, typename Rows>
void launch_wgemv(const at::Tensor& x, const uint8_t* w, const at::Tensor& bias,
                  const at::Tensor& residual, const at::Tensor& row_mask, at::Tensor& out,
                  const GemvParams& p) {
  const int64_t cols = p.act == Activation::kSiluGated ? kWRows / 2 : kWRows;
  const int64_t blocks = (p.n_out + cols - 1) / cols;
  TORCH_CHECK(blocks <= INT32_MAX, "linear: too many output columns for one launch");
  const dim3 grid(static_cast<unsigned>(blocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  const scalar_t* r = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
  const bool* mask = row_mask.defined() ? row_mask.data_ptr<bool>() : nullptr;
#define ANEE_FAST_WGEMV(MB)                                                                  \
  wgemv_kernel<scalar_t, Rows, MB><<<grid, kWWarps * kWarp, 0, stream>>>(                    \
      x.data_ptr<scalar_t>(), w, b, r, mask, out.data_ptr<scalar_t>(), p)
  if (p.M <= 1) ANEE_FAST_WGEMV(1);
  else if (p.M <= 2) ANEE_FAST_WGEMV(2);
  else if (p.M <= 4) ANEE_FAST_WGEMV(4);
  else ANEE_FAST_WGEMV(8);
#undef ANEE_FAST_WGEMV
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn(tag) with a null pointer of the C++ type of a float32, bfloat16 or float16 dtype.
template <typename Fn>
void with_float_type(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); return;
    case at::kBFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); return;
    case at::kHalf: fn(static_cast<c10::Half*>(nullptr)); return;
    default: TORCH_CHECK(false, "linear: expected float32, bfloat16 or float16, got ", t);
  }
}

// wgemv_kernel for M <= kGemvRows rows of x (a gemv dtype) against a quantized weight, or a float
// weight of another gemv dtype, with the whole epilogue.
void run_wgemv(const at::Tensor& x, const at::Tensor& w, WeightFormat format,
               const at::Tensor& bias, const at::Tensor& residual, const at::Tensor& row_mask,
               at::Tensor& out, GemvParams p) {
  p.ldw = w.stride(0) * w.element_size();           // bytes
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  with_float_type(x.scalar_type(), [&](auto x_tag) {
    using x_t = std::remove_pointer_t<decltype(x_tag)>;
    if (format != WeightFormat::kDense) {
      with_quantized_rows(format, [&](auto rows) {
        launch_wgemv<x_t, decltype(rows)>(x, wp, bias, residual, row_mask, out, p);
      });
      return;
    }
    with_float_type(w.scalar_type(), [&](auto w_tag) {
      using w_t = std::remove_pointer_t<decltype(w_tag)>;
      if constexpr (std::is_same_v<x_t, w_t>) {
        TORCH_CHECK(false, "linear: a float weight of x's dtype takes gemv_kernel or cuBLAS");
      } else {
        launch_wgemv<x_t, DenseRows<w_t>>(x, wp, bias, residual, row_mask, out, p);
      }
    });
  });
}

// ---- past the GEMV rows: dequantize, then cuBLAS -----------------------------------------

__device__ __forceinline__ bool device_aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// out [rows, K] (contiguous) = the weight's rows, each value's float32 (weight_formats.cuh)
// rounded once to out_t. One thread per slice of 8 values; 16-byte stores where aligned.
template <typename out_t, typename Rows>
__global__ void dequantize_kernel(const uint8_t* __restrict__ w, int64_t ldw, int64_t rows,
                                  int64_t K, out_t* __restrict__ out) {
  const int64_t slices = (K + kSliceValues - 1) / kSliceValues;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * slices) return;
  const int64_t n = i / slices, s = i % slices, k0 = s * kSliceValues;
  float v[kSliceValues];
  Rows::slice(Rows::row(w + n * ldw), s, K, v);
  out_t* o = out + n * K + k0;
  if (k0 + kSliceValues <= K && device_aligned16(o)) {
    constexpr int kPerStore = 16 / sizeof(out_t);
#pragma unroll
    for (int c = 0; c < kSliceValues; c += kPerStore) {
      uint4 raw;
      out_t* e = reinterpret_cast<out_t*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerStore; ++j) e[j] = static_cast<out_t>(v[c + j]);
      *reinterpret_cast<uint4*>(o + c) = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kSliceValues; ++j)
      if (k0 + j < K) o[j] = static_cast<out_t>(v[j]);
  }
}

// dst [n, K] (contiguous, a floating dtype) = rows start .. start + n of the weight w [N, K] in
// `format`: dequantize_kernel for a quantized one, a dtype conversion for a float one.
void weight_rows_into(const at::Tensor& w, WeightFormat format, int64_t start, int64_t n,
                      int64_t K, at::Tensor dst) {
  if (format == WeightFormat::kDense) {
    dst.copy_(w.narrow(0, start, n));
    return;
  }
  const int64_t threads = n * ((K + kSliceValues - 1) / kSliceValues);
  if (threads == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "linear: weight too large to dequantize in one launch");
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr()) + start * w.stride(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(dst.scalar_type(), "anee_fast_dequantize_cuda", [&] {
    with_quantized_rows(format, [&](auto rows) {
      dequantize_kernel<scalar_t, decltype(rows)><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          wp, w.stride(0), n, K, dst.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The op past the GEMV rows (or for x in float64), for a quantized weight or a float one of
// another dtype. The product is at::linear (cuBLAS) on the weight converted: a quantized one to
// x's dtype (tensor cores for bfloat16 / float16; each weight rounded once to it), a float one,
// like the reference, to float32 with x and the bias, the product rounded to x's dtype. Output
// columns go in slabs of at most kDequantValues weight values (gated: a slab's gate rows and their
// up rows), one buffer reused; then the epilogue as ATen ops.
at::Tensor converted_linear(const at::Tensor& x, const at::Tensor& w, WeightFormat format,
                            const std::optional<at::Tensor>& bias, const LinearSizes& sizes,
                            const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& row_mask) {
  const at::ScalarType dtype = format == WeightFormat::kDense ? at::kFloat : x.scalar_type();
  const at::Tensor xg = x.to(dtype);
  const std::optional<at::Tensor> bg =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(dtype)) : std::nullopt;
  const int64_t K = sizes.K, n_out = sizes.N_out;
  const int64_t parts = sizes.act == Activation::kSiluGated ? 2 : 1;
  const int64_t step = std::max<int64_t>(1, kDequantValues / std::max<int64_t>(parts * K, 1));
  if (step >= n_out) {                              // one slab: the whole weight
    at::Tensor wd = at::empty({sizes.N, K}, x.options().dtype(dtype));
    weight_rows_into(w, format, 0, sizes.N, K, wd);
    const at::Tensor y = at::_ops::linear::call(xg, wd, bg).to(x.scalar_type());
    return linear_epilogue(y, sizes.act, residual, row_mask);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  at::Tensor out = x.new_empty(shape);
  at::Tensor slab = at::empty({parts * step, K}, x.options().dtype(dtype));
  for (int64_t a = 0; a < n_out; a += step) {       // stream order keeps the slab's reuse safe
    const int64_t n = std::min(step, n_out - a);
    for (int64_t part = 0; part < parts; ++part)
      weight_rows_into(w, format, a + part * n_out, n, K, slab.narrow(0, part * n, n));
    std::optional<at::Tensor> b;
    if (bg.has_value()) {
      b = parts == 1 ? bg->narrow(0, a, n)
                     : at::cat({bg->narrow(0, a, n), bg->narrow(0, a + n_out, n)});
    }
    const std::optional<at::Tensor> r =
        residual.has_value() ? std::optional<at::Tensor>(residual->narrow(-1, a, n)) : std::nullopt;
    const at::Tensor y = at::_ops::linear::call(xg, slab.narrow(0, 0, parts * n), b).to(x.scalar_type());
    out.narrow(-1, a, n).copy_(linear_epilogue(y, sizes.act, r, row_mask));
  }
  return out;
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, c10::string_view activation,
                  const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& row_mask, c10::string_view weight_format) {
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device() &&
              (!bias.has_value() || bias->device() == x.device()) &&
              (!residual.has_value() || residual->device() == x.device()) &&
              (!row_mask.has_value() || row_mask->device() == x.device()),
              "linear: CUDA implementation called with tensors on other devices");
  const LinearSizes sizes =
      check_linear_args(x, weight, bias, activation, residual, row_mask, weight_format);
  const bool same_dtype = sizes.format == WeightFormat::kDense && weight.scalar_type() == x.scalar_type();
  const bool epilogue = sizes.act != Activation::kNone || residual.has_value() || row_mask.has_value();
  const bool empty = sizes.M == 0 || sizes.K == 0 || sizes.N_out == 0;
  if (same_dtype && (!epilogue || sizes.M > kGemvRows || empty))
    return linear_epilogue(at::_ops::linear::call(x, weight, bias), sizes.act, residual, row_mask);

  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = sizes.N_out;
  if (sizes.M == 0) return x.new_empty(shape);      // nothing to dequantize or convert for
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight_for_kernels(weight, sizes.format);
  // A quantized weight or a float one of another dtype: our GEMV up to kGemvRows rows, epilogue
  // or not (cuBLAS would need the weight converted first); float64 anywhere takes the GEMM path.
  const bool wgemv = !same_dtype && is_weight_kernel_dtype(x.scalar_type()) &&
                     (sizes.format != WeightFormat::kDense || is_weight_kernel_dtype(w.scalar_type()));
  if (!same_dtype && (!wgemv || sizes.M > kGemvRows || empty))
    return converted_linear(x, w, sizes.format, bias, sizes, residual, row_mask);

  const at::Tensor xc = x.reshape({sizes.M, sizes.K}).contiguous();
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
  if (same_dtype) {
    ANEE_FAST_DISPATCH_FLOATS(x.scalar_type(), "anee_fast_linear_cuda", [&] {
      launch_gemv<scalar_t>(xc, w, b, r, mask, out, p);
    });
  } else {
    run_wgemv(xc, w, sizes.format, b, r, mask, out, p);
  }
  return out.view(shape);
}

}  // namespace anee_fast::cuda
