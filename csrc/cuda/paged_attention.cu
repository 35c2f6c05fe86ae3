// CUDA implementation of anee_fast::paged_attention: causal attention of each query row over its
// own sequence's cached K/V, read through the block table (see ops/reference.py:paged_attention).
// Row n sees positions 0..positions[n] of sequence seq_idx[n] (only the last sliding_window when
// > 0); GQA: query head h reads kv head h / (heads / kv_heads). float32 math throughout.
//
// One block per (row, query head, split). A block walks its keys in tiles of one key per
// thread: every thread loads its key's K row and takes the dot product with the query (so a
// tile's K rows are all in flight at once, where a warp per key waits on one row after another),
// the block updates the running max and sum of the online softmax, then the threads, each owning
// a few dims of head_dim, add the tile's V rows weighted by their probabilities.
//
// Flash-decoding: when rows x heads are too few blocks to fill the GPU (decode at small batch),
// each row's keys are cut into `splits` contiguous chunks, one block each. A block stores its
// unnormalised (max, sum, output); the last of a (row, head)'s blocks to finish (an arrival
// counter) merges them and writes the output, in the same launch. The split count comes from
// shapes only (the table width), never from device values, so the launcher never syncs. All
// metadata is read on the device; a row with a negative position gets zeros, an out-of-range
// sequence, block or slot trips a device-side assert (and is never read).

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 128;                    // keys per tile: one per thread
constexpr int64_t kMaxHeadDim = 256;
constexpr int kMaxDimsPerThread = 2;             // head_dim <= kMaxDimsPerThread * kThreads
constexpr int64_t kTargetBlocks = 528;           // about 4 blocks per SM on an H100
constexpr int64_t kMaxSplits = 16;
constexpr int64_t kMinKeysPerSplit = kThreads;   // at the table's full width

struct Params {
  int64_t heads, group, d, num_slots, num_seqs, max_blocks, block_size, sliding_window;
  int64_t k_slot, k_head, v_slot, v_head;        // cache strides (head_dim is contiguous)
  float scale;
  bool vector_k;                                 // K rows read with 16-byte loads
  int dim_threads, groups;                       // V: threads per group (own dims), groups of keys
  int64_t splits;
  float* partials;                               // splits > 1: [rows * heads, splits, 2 + d]
  int* arrivals;                                 // splits > 1: [rows * heads], zero between launches
};

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Max of v over the block, returned to every thread (like block_sum).
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < kThreads / kWarp; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// q_s . row over head_dim d (q_s in float32, already scaled).
template <typename scalar_t>
__device__ __forceinline__ float dot_key(const scalar_t* __restrict__ row, const float* q_s, int64_t d,
                                         bool vector_loads) {
  float acc = 0.f;
  if (vector_loads) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    for (int64_t i = 0; i < d; i += kVec) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + i);
      const scalar_t* v = reinterpret_cast<const scalar_t*>(&raw);
      for (int j = 0; j < kVec; ++j) acc += q_s[i + j] * static_cast<float>(v[j]);
    }
  } else {
    for (int64_t i = 0; i < d; ++i) acc += q_s[i] * static_cast<float>(row[i]);
  }
  return acc;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k_cache,
    const scalar_t* __restrict__ v_cache, const int64_t* __restrict__ block_tables,
    const int64_t* __restrict__ seq_idx, const int64_t* __restrict__ positions,
    scalar_t* __restrict__ out, Params p) {
  __shared__ float q_s[kMaxHeadDim], prob_s[kThreads], acc_s[kMaxHeadDim], scratch[kWarp];
  __shared__ int64_t slot_s[kThreads];
  __shared__ bool last_s;
  const int64_t n = blockIdx.x, hq = blockIdx.y, split = blockIdx.z, g = hq / p.group;
  const int tid = threadIdx.x;
  const int64_t d = p.d;
  const int64_t row_head = n * p.heads + hq;
  scalar_t* orow = out + row_head * d;

  // This block's keys: split `split` of the row's visible positions (none if it sees nothing).
  const int64_t pos = positions[n];
  const int64_t s = seq_idx[n];
  const bool seq_ok = s >= 0 && s < p.num_seqs && pos < p.max_blocks * p.block_size;
  CUDA_KERNEL_ASSERT(pos < 0 || seq_ok);
  int64_t begin = 0, end = 0;
  if (pos >= 0 && seq_ok) {
    const int64_t lo = p.sliding_window > 0 ? max(int64_t{0}, pos - p.sliding_window + 1) : 0;
    const int64_t chunk = (pos - lo + p.splits) / p.splits;
    begin = lo + split * chunk;
    end = min(begin + chunk, pos + 1);
  }
  const int64_t* table = block_tables + (seq_ok ? s : 0) * p.max_blocks;
  for (int64_t i = tid; i < d; i += kThreads) q_s[i] = static_cast<float>(q[row_head * d + i]) * p.scale;

  const int dim_lane = tid % p.dim_threads, group = tid / p.dim_threads;
  float acc[kMaxDimsPerThread] = {0.f, 0.f};
  float m = -INFINITY, l = 0.f;                  // running max and sum: the same in every thread
  for (int64_t t0 = begin; t0 < end; t0 += kThreads) {
    __syncthreads();                             // q_s written; the last tile's prob_s, slot_s read
    const int64_t t = t0 + tid;
    float score = -INFINITY;
    int64_t slot = -1;
    if (t < end) {
      const int64_t blk = table[t / p.block_size];
      const int64_t candidate = blk * p.block_size + t % p.block_size;
      const bool slot_ok = blk >= 0 && candidate < p.num_slots;
      CUDA_KERNEL_ASSERT(slot_ok);
      if (slot_ok) {
        slot = candidate;
        score = dot_key(k_cache + slot * p.k_slot + g * p.k_head, q_s, d, p.vector_k);
      }
    }
    const float m_new = fmaxf(m, block_max(score, scratch));
    const float weight = score == -INFINITY ? 0.f : expf(score - m_new);
    const float correction = m == -INFINITY ? 0.f : expf(m - m_new);
    l = l * correction + block_sum(weight, scratch);
    m = m_new;
    prob_s[tid] = weight;
    slot_s[tid] = slot;
    __syncthreads();
    for (int e = 0; e < kMaxDimsPerThread; ++e) acc[e] *= correction;
    if (group < p.groups) {
      const int64_t tile = min(int64_t{kThreads}, end - t0);
      for (int64_t k = group; k < tile; k += p.groups) {
        const int64_t sk = slot_s[k];
        if (sk < 0) continue;
        const float w = prob_s[k];
        const scalar_t* vrow = v_cache + sk * p.v_slot + g * p.v_head;
        for (int e = 0; e < kMaxDimsPerThread; ++e) {
          const int64_t i = dim_lane + e * p.dim_threads;
          if (i < d) acc[e] += w * static_cast<float>(vrow[i]);
        }
      }
    }
  }

  // The groups' sums: this block's unnormalised output, dim i at acc_s[i] after the loop below.
  __syncthreads();
  if (group < p.groups)
    for (int e = 0; e < kMaxDimsPerThread; ++e) {
      const int64_t i = dim_lane + e * p.dim_threads;
      if (i < d) acc_s[group * d + i] = acc[e];
    }
  __syncthreads();
  if (p.splits == 1) {
    for (int64_t i = tid; i < d; i += kThreads) {
      float o = 0.f;
      for (int gr = 0; gr < p.groups; ++gr) o += acc_s[gr * d + i];
      orow[i] = static_cast<scalar_t>(l > 0.f ? o / l : 0.f);
    }
    return;
  }

  // Split: store (max, sum, output); the (row, head)'s last block to arrive merges all splits.
  const int64_t stride = 2 + d;
  float* part = p.partials + (row_head * p.splits + split) * stride;
  for (int64_t i = tid; i < d; i += kThreads) {
    float o = 0.f;
    for (int gr = 0; gr < p.groups; ++gr) o += acc_s[gr * d + i];
    part[2 + i] = o;
  }
  if (tid == 0) {
    part[0] = m;
    part[1] = l;
  }
  __threadfence();                               // the stores above are seen before the arrival
  __syncthreads();
  if (tid == 0) last_s = atomicAdd(p.arrivals + row_head, 1) == p.splits - 1;
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  const float* parts = p.partials + row_head * p.splits * stride;
  float m_all = -INFINITY;
  for (int64_t z = 0; z < p.splits; ++z) m_all = fmaxf(m_all, __ldcg(parts + z * stride));
  float l_all = 0.f;
  for (int64_t z = 0; z < p.splits; ++z) {
    const float mz = __ldcg(parts + z * stride);
    if (mz != -INFINITY) l_all += __ldcg(parts + z * stride + 1) * expf(mz - m_all);
  }
  for (int64_t i = tid; i < d; i += kThreads) {
    float o = 0.f;
    for (int64_t z = 0; z < p.splits; ++z) {
      const float mz = __ldcg(parts + z * stride);
      if (mz != -INFINITY) o += __ldcg(parts + z * stride + 2 + i) * expf(mz - m_all);
    }
    orow[i] = static_cast<scalar_t>(l_all > 0.f ? o / l_all : 0.f);
  }
  if (tid == 0) p.arrivals[row_head] = 0;       // ready for the next launch on this stream
}

// Splits per (row, head): enough blocks to fill the GPU, each split at least kMinKeysPerSplit of
// the most keys a row can see (the table's width, or the sliding window).
int64_t num_splits(int64_t rows_heads, int64_t max_keys) {
  if (rows_heads * 2 > kTargetBlocks) return 1;
  const int64_t by_keys = (max_keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  return std::max<int64_t>(1, std::min({kMaxSplits, kTargetBlocks / rows_heads, by_keys}));
}

// The arrival counters of split launches: one buffer per (device, stream), since launches on one
// stream run in order and each merging block resets its own counter to zero. Made on the stream's
// first call outside a capture, split or not (so the warm-up before a capture makes it), and kept
// (never freed: a CUDA graph that captured a launch holds its address). Inside a capture, a stream
// without one gets nullptr: zeros made there would be set only by the graph's own replays.
int* arrival_counters(const at::Tensor& like, cudaStream_t stream) {
  static std::mutex mutex;
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  const std::pair<int, cudaStream_t> key{like.get_device(), stream};
  auto found = buffers->find(key);
  if (found != buffers->end()) return found->second.data_ptr<int>();
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return nullptr;
  return buffers->emplace(key, at::zeros({kTargetBlocks}, like.options().dtype(at::kInt)))
      .first->second.data_ptr<int>();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

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
  const int64_t es = kc.element_size();
  p.vector_k = aligned16(kc.data_ptr()) && (d * es) % 16 == 0 && (p.k_slot * es) % 16 == 0 &&
               (p.k_head * es) % 16 == 0;
  p.dim_threads = static_cast<int>(std::min<int64_t>(kThreads, (d + kWarp - 1) / kWarp * kWarp));
  p.groups = kThreads / p.dim_threads;
  const int64_t table_keys = p.max_blocks * block_size;
  p.splits = num_splits(N * heads, sliding_window > 0 ? std::min(sliding_window, table_keys) : table_keys);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int* stream_counters = arrival_counters(q, stream);
  at::Tensor partials, launch_counters;
  if (p.splits > 1) {
    partials = at::empty({N * heads * p.splits * (2 + d)}, q.options().dtype(at::kFloat));
    p.partials = partials.data_ptr<float>();
    if (stream_counters == nullptr)              // a capture's first call on its stream: its own
      launch_counters = at::zeros({N * heads}, q.options().dtype(at::kInt));
    p.arrivals = stream_counters ? stream_counters : launch_counters.data_ptr<int>();
  }
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(heads), static_cast<unsigned>(p.splits));
  ANEE_FAST_DISPATCH_FLOATS(q.scalar_type(), "anee_fast_paged_attention_cuda", [&] {
    paged_attention_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
        tables.data_ptr<int64_t>(), seqs.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace anee_fast::cuda
