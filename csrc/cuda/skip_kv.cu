// CUDA implementation of anee_fast::skip_kv, one layer's SKIP path for the rows h [N, hidden]:
// norm -> K|V projection -> RoPE on K -> cache write at slot_mapping (see
// ops/reference.py:skip_kv); rows with slot -1 write nothing at all. With q_out kv_weight holds
// K | V | Q rows and every row's query, RoPE'd like K, goes to q_out: a PROCESS row's whole QKV
// projection. kv_weight is a float tensor or quantized rows (weight_format,
// ops/weight_formats.py).
//
// Up to kGemmRows rows (decode), skip_kv_kernel: one block per (row, chunk of a K, V or Q head);
// it normalises the row into shared memory, computes its columns (one warp per column, float32
// dot products; a quantized row dequantized in registers, slices of 8 values a lane,
// weight_formats.cuh), applies RoPE to K heads and writes the cache slot. Past kGemmRows rows that
// kernel would read every weight once per row, so the op runs as norm (the norm op's kernel) ->
// K|V projection (the linear op: cuBLAS, or for a quantized weight its GEMV up to 8 rows and
// dequantize + cuBLAS past them) -> rope_write_kernel; so does a row too wide for the kernel's
// shared memory (hidden past about 12K), a float weight of another dtype than h and a quantized
// one under float64 h (linear's paths for them).
// The per-row metadata (slot, position) is read on the device, so a K/V block whose row has no
// slot simply returns: no host sync. The caches are one layer of the whole cache (views): writes
// land in the given tensors, through their strides.

#include <type_traits>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPairs = 4;              // column pairs per block of skip_kv_kernel: 8 warps, 8 columns
// The fused kernel keeps the normalised row in dynamic shared memory, next to its static ys and
// scratch: together they must fit the default 48 KB per block (a larger hidden takes the GEMM path).
constexpr size_t kStaticSharedBytes = (2 * kPairs + kWarp) * sizeof(float);
constexpr size_t kMaxSharedBytes = 48 * 1024;
// More rows than this: norm -> cuBLAS -> rope_write_kernel. On an H100 (bf16, GPT-2 small) the
// fused kernel took 11.5 us at 1 row but 43.7 us at 16 (every block re-reads its weights per
// row), the GEMM path 21.5 us at 64 rows (docs/gpu-results.md).
constexpr int64_t kGemmRows = 2;

struct Params {
  int64_t hidden, kv_heads, q_heads, d, num_slots;
  int64_t w_row;                     // kv_weight row stride in bytes (the hidden dim is contiguous)
  int64_t k_s[3], v_s[3];            // cache strides: slot, head, dim
  int64_t q_s[3];                    // q_out strides: row, head, dim
  float eps, rope_scale;
  bool rms;
};

// Columns of a head are handled in pairs (i, i + half), half = ceil(d / 2): rotate-half RoPE
// mixes exactly those two. Heads are numbered K heads, V heads, then Q heads (the rows of
// kv_weight). write_pair stores one pair of projected values a, b (b exists when i + half < d)
// of head head_z for row n, slot `slot` (K/V), rotating K and Q heads when inv_freq is given.
template <typename scalar_t>
__device__ __forceinline__ void write_pair(float a, float b, int64_t i, int64_t head_z, int64_t n,
                                           int64_t slot, int64_t position,
                                           const float* inv_freq, scalar_t* k_cache,
                                           scalar_t* v_cache, scalar_t* q_out, const Params& p) {
  const int64_t half = (p.d + 1) / 2;
  const bool has_b = i + half < p.d;
  const bool is_v = head_z >= p.kv_heads && head_z < 2 * p.kv_heads;
  scalar_t* dst;
  int64_t s_dim;
  if (head_z >= 2 * p.kv_heads) {
    dst = q_out + n * p.q_s[0] + (head_z - 2 * p.kv_heads) * p.q_s[1];
    s_dim = p.q_s[2];
  } else {
    const int64_t* st = is_v ? p.v_s : p.k_s;
    dst = (is_v ? v_cache : k_cache) + slot * st[0] + (head_z % p.kv_heads) * st[1];
    s_dim = st[2];
  }
  if (!is_v && inv_freq != nullptr) {      // RoPE needs an even d: has_b holds
    const float angle = static_cast<float>(position) * inv_freq[i];
    const float cs = cosf(angle) * p.rope_scale, sn = sinf(angle) * p.rope_scale;
    const float ra = a * cs - b * sn, rb = b * cs + a * sn;
    a = ra;
    b = rb;
  }
  dst[i * s_dim] = static_cast<scalar_t>(a);
  if (has_b) dst[(i + half) * s_dim] = static_cast<scalar_t>(b);
}

// xs [hidden] . weight row `row` (its first byte), summed over the warp: every lane gets it. A
// float row of h's dtype (Rows = DenseRows<scalar_t>) one element a lane at a time, a quantized
// one a slice of 8 values a lane (weight_formats.cuh).
template <typename scalar_t, typename Rows>
__device__ __forceinline__ float row_dot(const uint8_t* row, const float* xs, int64_t hidden,
                                         int lane) {
  float s = 0.f;
  if constexpr (std::is_same_v<Rows, DenseRows<scalar_t>>) {
    const scalar_t* wrow = reinterpret_cast<const scalar_t*>(row);
    for (int64_t i = lane; i < hidden; i += kWarp) s += xs[i] * static_cast<float>(wrow[i]);
  } else {
    const typename Rows::Row r = Rows::row(row);
    const int64_t slices = (hidden + kSliceValues - 1) / kSliceValues;
    for (int64_t sl = lane; sl < slices; sl += kWarp) {
      float w[kSliceValues];
      Rows::slice(r, sl, hidden, w);
      const int64_t k0 = sl * kSliceValues;
      if (k0 + kSliceValues <= hidden) {             // xs is 16-byte aligned: two float4
        const float4 a = *reinterpret_cast<const float4*>(xs + k0);
        const float4 b = *reinterpret_cast<const float4*>(xs + k0 + 4);
        s += a.x * w[0] + a.y * w[1] + a.z * w[2] + a.w * w[3] + b.x * w[4] + b.y * w[5] +
             b.z * w[6] + b.w * w[7];
      } else {
#pragma unroll
        for (int j = 0; j < kSliceValues; ++j)
          if (k0 + j < hidden) s += xs[k0 + j] * w[j];
      }
    }
  }
  return warp_sum(s);
}

// Up to kGemmRows rows. Block (row n, y): y picks a K, V or Q head and a chunk of
// kPairs column pairs of it (GPT-2 small, one row: 24 K/V heads x 8 chunks = 192 blocks, enough
// to keep the memory system busy). The block normalises its row into shared memory, computes its
// 2 * kPairs columns (one warp per column, float32 dot products) and writes them.
template <typename scalar_t, typename Rows>
__global__ void skip_kv_kernel(const scalar_t* __restrict__ h, const float* __restrict__ norm_w,
                               const float* __restrict__ norm_b, const uint8_t* __restrict__ kv_w,
                               const scalar_t* __restrict__ kv_b, const int64_t* __restrict__ positions,
                               const float* __restrict__ inv_freq, scalar_t* k_cache, scalar_t* v_cache,
                               const int64_t* __restrict__ slots, scalar_t* q_out, Params p) {
  const int64_t n = blockIdx.x;
  const int64_t half = (p.d + 1) / 2, chunks = (half + kPairs - 1) / kPairs;
  const int64_t head_z = blockIdx.y / chunks, p0 = (blockIdx.y % chunks) * kPairs;
  const int64_t slot = slots[n];
  CUDA_KERNEL_ASSERT(slot >= -1 && slot < p.num_slots);
  // A whole-block decision, taken before any barrier. Q heads are written for every row.
  if (head_z < 2 * p.kv_heads && (slot < 0 || slot >= p.num_slots)) return;

  extern __shared__ float4 shared_raw[];   // float4: 16-byte aligned for row_dot's loads
  float* shared = reinterpret_cast<float*>(shared_raw);
  float* xs = shared;                 // the normalised row [hidden]
  __shared__ float ys[2 * kPairs];    // columns p0 + k (k < kPairs) and p0 + k + half
  __shared__ float scratch[kWarp];

  // The norm, rounded to the tensors' dtype as the reference's norm returns.
  const scalar_t* hr = h + n * p.hidden;
  block_normed_row(hr, p.hidden, p.eps, p.rms, norm_w, norm_b, scratch, xs);

  // Projection: head column c is row col0 + c of the K|V(|Q) weight.
  const int64_t col0 = head_z * p.d;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int c = warp; c < 2 * kPairs; c += warps) {
    const int64_t col = c < kPairs ? p0 + c : p0 + (c - kPairs) + half;
    if ((c < kPairs && p0 + c >= half) || col >= p.d) continue;
    float s = row_dot<scalar_t, Rows>(kv_w + (col0 + col) * p.w_row, xs, p.hidden, lane);
    if (lane == 0) {
      if (kv_b != nullptr) s += static_cast<float>(kv_b[col0 + col]);
      ys[c] = static_cast<float>(static_cast<scalar_t>(s));
    }
  }
  __syncthreads();
  const int64_t i = p0 + threadIdx.x;
  if (threadIdx.x < kPairs && i < half) {
    write_pair(ys[threadIdx.x], ys[kPairs + threadIdx.x], i, head_z, n, slot, positions[n],
               inv_freq, k_cache, v_cache, q_out, p);
  }
}

// K/V(/Q) of many rows, already projected (kv [N, 2 * kv_size (+ q_size)], row stride
// kv_stride): RoPE on K and Q heads, the cache write and q_out. One block per row, a thread per
// column pair.
template <typename scalar_t>
__global__ void rope_write_kernel(const scalar_t* __restrict__ kv, int64_t kv_stride,
                                  const int64_t* __restrict__ positions,
                                  const float* __restrict__ inv_freq, scalar_t* k_cache,
                                  scalar_t* v_cache, const int64_t* __restrict__ slots,
                                  scalar_t* q_out, Params p) {
  const int64_t n = blockIdx.x;
  const int64_t slot = slots[n];
  CUDA_KERNEL_ASSERT(slot >= -1 && slot < p.num_slots);
  const bool writes_kv = slot >= 0 && slot < p.num_slots;
  const int64_t half = (p.d + 1) / 2;
  const scalar_t* row = kv + n * kv_stride;
  // K heads, V heads, then Q heads; a row without a slot writes only its query.
  const int64_t first_head = writes_kv ? 0 : 2 * p.kv_heads;
  for (int64_t t = first_head * half + threadIdx.x; t < (2 * p.kv_heads + p.q_heads) * half;
       t += blockDim.x) {
    const int64_t head_z = t / half, i = t % half;
    const scalar_t* src = row + head_z * p.d;
    const float a = static_cast<float>(src[i]);
    const float b = i + half < p.d ? static_cast<float>(src[i + half]) : 0.f;
    write_pair(a, b, i, head_z, n, slot, positions[n], inv_freq, k_cache, v_cache, q_out, p);
  }
}

}  // namespace

void skip_kv(const at::Tensor& h, const at::Tensor& norm_weight,
             const std::optional<at::Tensor>& norm_bias, const at::Tensor& kv_weight,
             const std::optional<at::Tensor>& kv_bias, const at::Tensor& positions,
             const std::optional<at::Tensor>& inv_freq, double rope_scale, at::Tensor& k_cache,
             at::Tensor& v_cache, const at::Tensor& slot_mapping, double eps, bool rms,
             const std::optional<at::Tensor>& q_out, c10::string_view weight_format) {
  TORCH_CHECK(h.is_cuda(), "skip_kv: CUDA implementation called with a ", h.device(), " tensor h");
  check_cuda(k_cache, h, "skip_kv", "k_cache");
  check_cuda(v_cache, h, "skip_kv", "v_cache");
  check_cuda(kv_weight, h, "skip_kv", "kv_weight");
  if (q_out.has_value()) check_cuda(*q_out, h, "skip_kv", "q_out");
  const SkipKvSizes sizes = check_skip_kv_args(h, norm_weight, norm_bias, kv_weight, kv_bias,
                                               positions, inv_freq, k_cache, v_cache,
                                               slot_mapping, q_out, weight_format);
  const int64_t N = sizes.N, hidden = sizes.hidden;
  const int64_t kv_heads = sizes.kv_heads, q_heads = sizes.q_heads, d = sizes.d;
  const int64_t width = (2 * kv_heads + q_heads) * d;
  const bool rope = inv_freq.has_value();
  TORCH_CHECK(N <= INT32_MAX && 2 * kv_heads + q_heads <= 65535,
              "skip_kv: too many rows or heads for one launch");
  if (N == 0 || width == 0 || hidden == 0) return;

  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hc = h.contiguous();
  const at::Tensor nw = float_tensor(norm_weight, h, "skip_kv", "norm_weight");
  const at::Tensor nb = norm_bias.has_value() ? float_tensor(*norm_bias, h, "skip_kv", "norm_bias")
                                              : at::Tensor();
  const WeightFormat format = sizes.format;
  const at::Tensor w = weight_for_kernels(kv_weight, format);
  const at::Tensor b = kv_bias.has_value() ? kv_bias->contiguous() : at::Tensor();
  if (b.defined()) check_cuda(b, h, "skip_kv", "kv_bias");
  const at::Tensor slots = index_tensor(slot_mapping, h, "skip_kv", "slot_mapping");
  const at::Tensor pos = index_tensor(positions, h, "skip_kv", "positions");
  const at::Tensor freq = rope ? float_tensor(*inv_freq, h, "skip_kv", "inv_freq") : at::Tensor();

  Params p{};
  p.hidden = hidden;
  p.kv_heads = kv_heads;
  p.q_heads = q_heads;
  p.d = d;
  p.num_slots = sizes.num_slots;
  p.w_row = w.stride(0) * w.element_size();
  for (int i = 0; i < 3; ++i) {
    p.k_s[i] = k_cache.stride(i);
    p.v_s[i] = v_cache.stride(i);
    p.q_s[i] = q_out.has_value() ? q_out->stride(i) : 0;
  }
  p.eps = static_cast<float>(eps);
  p.rope_scale = static_cast<float>(rope_scale);
  p.rms = rms;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared_bytes = sizeof(float) * hidden;
  // The fused kernel reads a float weight of h's dtype, or a quantized one under float32,
  // bfloat16 or float16 h.
  const bool fused_weight = format == WeightFormat::kDense
                                ? w.scalar_type() == h.scalar_type()
                                : is_weight_kernel_dtype(h.scalar_type());
  if (N > kGemmRows || shared_bytes + kStaticSharedBytes > kMaxSharedBytes || !fused_weight) {
    const at::Tensor x = norm(hc, nw, nb.defined() ? std::optional<at::Tensor>(nb) : std::nullopt,
                              eps, rms);
    const at::Tensor kv = anee_fast::cuda::linear(
        x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt, "none", std::nullopt,
        std::nullopt, weight_format);
    ANEE_FAST_DISPATCH_FLOATS(h.scalar_type(), "anee_fast_rope_write_cuda", [&] {
      rope_write_kernel<scalar_t><<<static_cast<unsigned>(N), 128, 0, stream>>>(
          kv.data_ptr<scalar_t>(), kv.stride(0), pos.data_ptr<int64_t>(),
          rope ? freq.data_ptr<float>() : nullptr, k_cache.data_ptr<scalar_t>(),
          v_cache.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
          q_out.has_value() ? q_out->data_ptr<scalar_t>() : nullptr, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const int64_t chunks = ((d + 1) / 2 + kPairs - 1) / kPairs;
  TORCH_CHECK((2 * kv_heads + q_heads) * chunks <= 65535, "skip_kv: too many heads for one launch");
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((2 * kv_heads + q_heads) * chunks));
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  ANEE_FAST_DISPATCH_FLOATS(h.scalar_type(), "anee_fast_skip_kv_cuda", [&] {
    auto launch = [&](auto rows) {
      skip_kv_kernel<scalar_t, decltype(rows)><<<grid, kThreads, shared_bytes, stream>>>(
          hc.data_ptr<scalar_t>(), nw.data_ptr<float>(), nb.defined() ? nb.data_ptr<float>() : nullptr,
          wp, b.defined() ? b.data_ptr<scalar_t>() : nullptr,
          pos.data_ptr<int64_t>(), rope ? freq.data_ptr<float>() : nullptr,
          k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
          q_out.has_value() ? q_out->data_ptr<scalar_t>() : nullptr, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (format == WeightFormat::kDense) {
      launch(DenseRows<scalar_t>());
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      with_quantized_rows(format, launch);
    }
  });
}

}  // namespace anee_fast::cuda
