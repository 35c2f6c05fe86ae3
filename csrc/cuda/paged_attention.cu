// CUDA implementation of anee_fast::paged_attention: causal attention of each query row over its
// own sequence's cached K/V, read through the block table (see reference_ops.paged_attention).
// Row n sees positions 0..positions[n] of sequence seq_idx[n] (only the last sliding_window when
// > 0); GQA: query head h reads kv head h / (heads / kv_heads). float32 math throughout.
//
// One block per (row, query head). Each warp walks a strided share of the visible keys with its
// own online softmax (running max, running sum, accumulator; each lane owns head_dim / 32
// elements), then the block merges the warps' partial results. All metadata is read on the
// device; a row with a negative position gets zeros, an out-of-range sequence, block or slot
// trips a device-side assert (and is never read).

#include <cmath>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kPerLane = 8;                      // head_dim <= 32 * 8
constexpr int64_t kMaxHeadDim = kWarp * kPerLane;

struct Params {
  int64_t heads, group, d, num_slots, num_seqs, max_blocks, block_size, sliding_window;
  int64_t k_slot, k_head, v_slot, v_head;        // cache strides (head_dim is contiguous)
  float scale;
};

template <typename scalar_t>
__global__ void paged_attention_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k_cache,
                                       const scalar_t* __restrict__ v_cache,
                                       const int64_t* __restrict__ block_tables,
                                       const int64_t* __restrict__ seq_idx,
                                       const int64_t* __restrict__ positions,
                                       scalar_t* __restrict__ out, Params p) {
  __shared__ float warp_max[kWarps], warp_sum_exp[kWarps];
  extern __shared__ float warp_acc[];            // [kWarps, d]
  const int64_t n = blockIdx.x, hq = blockIdx.y, g = hq / p.group;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t d = p.d;
  scalar_t* orow = out + (n * p.heads + hq) * d;

  const int64_t pos = positions[n];
  const int64_t s = seq_idx[n];
  const bool seq_ok = s >= 0 && s < p.num_seqs && pos < p.max_blocks * p.block_size;
  CUDA_KERNEL_ASSERT(pos < 0 || seq_ok);
  if (pos < 0 || !seq_ok) {                      // sees nothing: zeros
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) orow[i] = static_cast<scalar_t>(0.f);
    return;
  }
  const int64_t lo = p.sliding_window > 0 ? max(int64_t{0}, pos - p.sliding_window + 1) : 0;
  const int64_t* table = block_tables + s * p.max_blocks;

  float qv[kPerLane], acc[kPerLane];
  const scalar_t* qrow = q + (n * p.heads + hq) * d;
  for (int e = 0; e < kPerLane; ++e) {
    const int64_t i = lane + e * kWarp;
    qv[e] = i < d ? static_cast<float>(qrow[i]) : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int64_t t = lo + warp; t <= pos; t += kWarps) {
    const int64_t blk = table[t / p.block_size];
    const int64_t slot = blk * p.block_size + t % p.block_size;
    const bool slot_ok = blk >= 0 && slot < p.num_slots;
    CUDA_KERNEL_ASSERT(slot_ok);
    if (!slot_ok) continue;                      // the same for every lane of the warp
    const scalar_t* krow = k_cache + slot * p.k_slot + g * p.k_head;
    const scalar_t* vrow = v_cache + slot * p.v_slot + g * p.v_head;
    float dot = 0.f;
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t i = lane + e * kWarp;
      if (i < d) dot += qv[e] * static_cast<float>(krow[i]);
    }
    const float score = warp_sum(dot) * p.scale;
    const float m_new = fmaxf(m, score);
    const float correction = expf(m - m_new);    // 0 for the first key (m = -inf)
    const float weight = expf(score - m_new);
    l = l * correction + weight;
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t i = lane + e * kWarp;
      if (i < d) acc[e] = acc[e] * correction + weight * static_cast<float>(vrow[i]);
    }
    m = m_new;
  }

  // Merge the warps (a warp that saw no key has m = -inf, l = 0, acc = 0).
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum_exp[warp] = l;
  }
  for (int e = 0; e < kPerLane; ++e) {
    const int64_t i = lane + e * kWarp;
    if (i < d) warp_acc[warp * d + i] = acc[e];
  }
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, warp_max[w]);
  float l_all = 0.f;
  for (int w = 0; w < kWarps; ++w)
    if (warp_max[w] != -INFINITY) l_all += warp_sum_exp[w] * expf(warp_max[w] - m_all);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < kWarps; ++w)
      if (warp_max[w] != -INFINITY) o += warp_acc[w * d + i] * expf(warp_max[w] - m_all);
    orow[i] = static_cast<scalar_t>(l_all > 0.f ? o / l_all : 0.f);
  }
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_idx,
                           const at::Tensor& positions, int64_t block_size, double scale,
                           int64_t sliding_window) {
  TORCH_CHECK(q.is_cuda(), "paged_attention: CUDA implementation called with a ", q.device(),
              " tensor q");
  check_cuda(k_cache, q, "paged_attention", "k_cache");
  check_cuda(v_cache, q, "paged_attention", "v_cache");
  const PagedAttentionSizes sizes =
      check_paged_attention_args(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size);
  const int64_t N = sizes.N, heads = sizes.heads, d = sizes.d;
  TORCH_CHECK(d <= kMaxHeadDim, "paged_attention: head_dim ", d, " is larger than the kernel's ",
              kMaxHeadDim);
  TORCH_CHECK(N <= INT32_MAX && heads <= 65535, "paged_attention: too many rows or heads for one launch");

  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor tables = index_tensor(block_tables, q, "paged_attention", "block_tables");
  const at::Tensor seqs = index_tensor(seq_idx, q, "paged_attention", "seq_idx");
  const at::Tensor pos = index_tensor(positions, q, "paged_attention", "positions");
  const at::Tensor qc = q.contiguous();
  // The kernel reads cache rows with unit stride along head_dim.
  const at::Tensor kc = k_cache.stride(2) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor vc = v_cache.stride(2) == 1 ? v_cache : v_cache.contiguous();
  at::Tensor out = q.new_empty({N, heads, d});
  if (N == 0 || heads == 0 || d == 0) return out;

  Params p{};
  p.heads = heads;
  p.group = heads / sizes.kv_heads;
  p.d = d;
  p.num_slots = sizes.num_slots;
  p.num_seqs = tables.size(0);
  p.max_blocks = tables.size(1);
  p.block_size = block_size;
  p.sliding_window = sliding_window;
  p.k_slot = kc.stride(0);
  p.k_head = kc.stride(1);
  p.v_slot = vc.stride(0);
  p.v_head = vc.stride(1);
  p.scale = static_cast<float>(scale);

  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(heads));
  const size_t shared_bytes = sizeof(float) * kWarps * d;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(q.scalar_type(), "anee_fast_paged_attention_cuda", [&] {
    paged_attention_kernel<scalar_t><<<grid, kThreads, shared_bytes, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
        tables.data_ptr<int64_t>(), seqs.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace anee_fast::cuda
