// CPU implementation of anee_fast::paged_attention: causal attention of each query row over its
// own sequence's cached K/V, read through the block table (see ops/reference.py:paged_attention).
// Row n sees positions 0..positions[n] of sequence seq_idx[n] (only the last sliding_window
// when > 0); GQA: query head h reads kv head h / (heads / kv_heads). float32 math throughout.
//
// One task per (row, kv head): the K/V rows it reads serve every query head of the group.
// Rows with a negative position see nothing and get zeros.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {
namespace {

// What every task reads and writes (see paged_attention below).
template <typename scalar_t>
struct Attention {
  const scalar_t *q, *k, *v;
  scalar_t* out;
  int64_t ks0, ks1, vs0, vs1;                      // cache strides: slot, kv head
  const int64_t *tables, *seqs, *pos;
  int64_t max_blocks, block_size, heads, kv_heads, group, d, sliding_window;
  float scale;
};

// e^x for the softmax's x <= 0 in plain arithmetic that the compiler vectorises (std::exp is a
// call a score): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7, times 2^n built
// in the exponent bits. Within 2 ulp of std::exp on [-87, 0]; below -87 (e^x < 2e-38, nothing
// beside the largest score's 1) it gives e^-87.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;   // round to nearest
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;   // ln2 in 2 parts
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// Tasks begin .. end - 1, one per (row, kv head). Compiled once per instruction set
// (attend_avx512 / attend_avx2 / here): the loops are plain C++ that the compiler vectorises for
// the set it is given, where the extension's own flags allow only SSE2.
template <typename scalar_t>
__attribute__((always_inline)) inline void attend(const Attention<scalar_t>& a, int64_t begin,
                                                  int64_t end) {
  const int64_t group = a.group, d = a.d, block_size = a.block_size;
  std::vector<float> qf(group * d), acc(group * d), denom(group), scores;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / a.kv_heads, g = task % a.kv_heads;
    scalar_t* orow = a.out + (n * a.heads + g * group) * d;   // the group's heads are contiguous
    const int64_t p = a.pos[n];
    if (p < 0) {
      std::fill(orow, orow + group * d, static_cast<scalar_t>(0.f));
      continue;
    }
    const int64_t lo = a.sliding_window > 0 ? std::max<int64_t>(0, p - a.sliding_window + 1) : 0;
    const int64_t ctx = p - lo + 1;
    const int64_t* table = a.tables + a.seqs[n] * a.max_blocks;
    const scalar_t* qrow = a.q + (n * a.heads + g * group) * d;
    for (int64_t i = 0; i < group * d; ++i) qf[i] = static_cast<float>(qrow[i]);
    scores.resize(group * ctx);

    // Scores: one pass over the keys, all heads of the group, a cache block's run of slots at a
    // time (one division a block, not one a key).
    for (int64_t t = lo; t <= p;) {
      const int64_t run = std::min(block_size - t % block_size, p - t + 1);
      const scalar_t* krow = a.k + (table[t / block_size] * block_size + t % block_size) * a.ks0 +
                             g * a.ks1;
      for (int64_t j = 0; j < run; ++j, ++t, krow += a.ks0)
        for (int64_t gi = 0; gi < group; ++gi)
          scores[gi * ctx + (t - lo)] = dot(qf.data() + gi * d, krow, d) * a.scale;
    }
    // Softmax (unnormalised; divided out at the end).
    for (int64_t gi = 0; gi < group; ++gi) {
      float* s = scores.data() + gi * ctx;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < ctx; ++t) mx = std::max(mx, s[t]);
      float sum = 0.f;
      for (int64_t t = 0; t < ctx; ++t) {
        s[t] = exp_nonpositive(s[t] - mx);
        sum += s[t];
      }
      denom[gi] = sum;
    }
    // Weighted sum of the values.
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t t = lo; t <= p;) {
      const int64_t run = std::min(block_size - t % block_size, p - t + 1);
      const scalar_t* vrow = a.v + (table[t / block_size] * block_size + t % block_size) * a.vs0 +
                             g * a.vs1;
      for (int64_t j = 0; j < run; ++j, ++t, vrow += a.vs0)
        for (int64_t gi = 0; gi < group; ++gi) {
          const float w = scores[gi * ctx + (t - lo)];
          float* acc_row = acc.data() + gi * d;
          for (int64_t i = 0; i < d; ++i) acc_row[i] += w * static_cast<float>(vrow[i]);
        }
    }
    for (int64_t gi = 0; gi < group; ++gi) {
      const float inv = 1.f / denom[gi];
      for (int64_t i = 0; i < d; ++i)
        orow[gi * d + i] = static_cast<scalar_t>(acc[gi * d + i] * inv);
    }
  }
}

template <typename scalar_t>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void attend_avx512(
    const Attention<scalar_t>& a, int64_t begin, int64_t end) {
  attend(a, begin, end);
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void attend_avx2(const Attention<scalar_t>& a,
                                                           int64_t begin, int64_t end) {
  attend(a, begin, end);
}

template <typename scalar_t>
void attend_default(const Attention<scalar_t>& a, int64_t begin, int64_t end) {
  attend(a, begin, end);
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_idx,
                           const at::Tensor& positions, int64_t block_size, double scale,
                           int64_t sliding_window) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_attention: CPU implementation called with non-CPU tensors");
  const PagedAttentionSizes sizes =
      check_paged_attention_args(q, k_cache, v_cache, block_tables, seq_idx, positions, block_size);
  const int64_t N = sizes.N, heads = sizes.heads, d = sizes.d;
  const int64_t num_slots = sizes.num_slots, kv_heads = sizes.kv_heads;
  const int64_t group = heads / kv_heads;

  const at::Tensor tables_t = index_tensor(block_tables, "block_tables");
  const at::Tensor seq_t = index_tensor(seq_idx, "seq_idx");
  const at::Tensor pos_t = index_tensor(positions, "positions");
  const int64_t* tables = tables_t.data_ptr<int64_t>();
  const int64_t* seqs = seq_t.data_ptr<int64_t>();
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t num_seqs = tables_t.size(0), max_blocks = tables_t.size(1);

  // Every slot a row will read must exist: checked up front, not inside the parallel loop.
  for (int64_t n = 0; n < N; ++n) {
    const int64_t p = pos[n];
    if (p < 0) continue;
    TORCH_CHECK(seqs[n] >= 0 && seqs[n] < num_seqs, "paged_attention: seq_idx[", n, "] = ",
                seqs[n], " is out of range");
    TORCH_CHECK(p < max_blocks * block_size, "paged_attention: positions[", n, "] = ", p,
                " is beyond the block table");
    const int64_t lo = sliding_window > 0 ? std::max<int64_t>(0, p - sliding_window + 1) : 0;
    for (int64_t b = lo / block_size; b <= p / block_size; ++b) {
      const int64_t blk = tables[seqs[n] * max_blocks + b];
      TORCH_CHECK(blk >= 0 && (blk + 1) * block_size <= num_slots, "paged_attention: block ", blk,
                  " (sequence ", seqs[n], ", entry ", b, ") is outside the cache");
    }
  }

  const at::Tensor qc = q.contiguous();
  // The kernel reads cache rows with unit stride along head_dim.
  const at::Tensor kc = k_cache.stride(2) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor vc = v_cache.stride(2) == 1 ? v_cache : v_cache.contiguous();
  at::Tensor out = q.new_empty({N, heads, d});
  if (N == 0 || d == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "anee_fast_paged_attention", [&] {
    const Attention<scalar_t> a{qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
                                tables, seqs, pos, max_blocks, block_size, heads, kv_heads, group,
                                d, sliding_window, static_cast<float>(scale)};
    const auto fn = has_avx512() ? attend_avx512<scalar_t>
                    : has_avx2_fma() ? attend_avx2<scalar_t>
                                     : attend_default<scalar_t>;
    at::parallel_for(0, N * kv_heads, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  });
  return out;
}

}  // namespace anee_fast::cpu
