// CPU implementation of anee_fast::skip_kv, the SKIP path of `nl` consecutive layers that share
// the residual h [N, hidden]: norm -> K|V projection -> RoPE on K -> cache write (see
// ops/reference.py:skip_kv). Row n writes layers first_layer[n]..nl-1 at slot slot_mapping[n];
// rows with slot -1 write nothing at all. With q_out (one layer) kv_weight holds K | V | Q rows
// and every row's query, RoPE'd like K, goes to q_out: a PROCESS row's whole QKV projection.
//
// The norm statistics of h are computed once for all layers; each layer then projects only its
// active rows (a CPU op may read the slot mapping on the host: that is row compaction for free).
// kv_weight may be a strided view (a slice of the stacked [L, 2kv+q, hidden] weights) and the
// caches slices of the whole cache: writes land in the given tensors.
#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {

void skip_kv(const at::Tensor& h, const at::Tensor& norm_weight,
             const std::optional<at::Tensor>& norm_bias, const at::Tensor& kv_weight,
             const std::optional<at::Tensor>& kv_bias, const at::Tensor& positions,
             const std::optional<at::Tensor>& inv_freq, double rope_scale, at::Tensor& k_cache,
             at::Tensor& v_cache, const at::Tensor& slot_mapping,
             const std::optional<at::Tensor>& first_layer, double eps, bool rms,
             const std::optional<at::Tensor>& q_out) {
  TORCH_CHECK(h.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
              kv_weight.device().is_cpu() && (!q_out.has_value() || q_out->device().is_cpu()),
              "skip_kv: CPU implementation called with non-CPU tensors");
  const SkipKvSizes sizes =
      check_skip_kv_args(h, norm_weight, norm_bias, kv_weight, kv_bias, positions, inv_freq,
                         k_cache, v_cache, slot_mapping, first_layer, q_out);
  const int64_t N = sizes.N, hidden = sizes.hidden, nl = sizes.nl, num_slots = sizes.num_slots;
  const int64_t kv_heads = sizes.kv_heads, d = sizes.d, kv_size = kv_heads * d;
  const bool rope = inv_freq.has_value();

  const at::Tensor slots_t = index_tensor(slot_mapping, "slot_mapping");
  const int64_t* slots = slots_t.data_ptr<int64_t>();
  check_slots(slots, N, num_slots);
  const at::Tensor first_t =
      first_layer.has_value() ? index_tensor(*first_layer, "first_layer") : at::Tensor();
  const int64_t* first = first_t.defined() ? first_t.data_ptr<int64_t>() : nullptr;

  // Rows to project: those that write at least one layer (slot >= 0 and first_layer < nl), or
  // every row when queries are asked for.
  std::vector<int64_t> rows;
  rows.reserve(N);
  for (int64_t n = 0; n < N; ++n)
    if (q_out.has_value() || (slots[n] >= 0 && (first == nullptr || first[n] < nl))) rows.push_back(n);
  if (rows.empty()) return;
  const int64_t q_heads = sizes.q_heads, width = 2 * kv_size + q_heads * d;

  const at::Tensor hc = h.contiguous();
  const at::Tensor nw = float_tensor(norm_weight).view({nl, hidden});
  const at::Tensor nb = norm_bias.has_value() ? float_tensor(*norm_bias).view({nl, hidden})
                                              : at::Tensor();
  const float feps = static_cast<float>(eps);

  // RoPE tables of the active rows: cos/sin of position * inv_freq (float32), times rope_scale.
  const int64_t R = static_cast<int64_t>(rows.size()), half = d / 2;
  std::vector<float> cos_t, sin_t;
  if (rope) {
    const at::Tensor pos_t = index_tensor(positions, "positions");
    const at::Tensor freq_t = float_tensor(*inv_freq);
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    const float* freq = freq_t.data_ptr<float>();
    const float scale = static_cast<float>(rope_scale);
    cos_t.resize(R * half);
    sin_t.resize(R * half);
    at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float p = static_cast<float>(pos[rows[r]]);
        for (int64_t i = 0; i < half; ++i) {
          const float angle = p * freq[i];
          cos_t[r * half + i] = std::cos(angle) * scale;
          sin_t[r * half + i] = std::sin(angle) * scale;
        }
      }
    });
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "anee_fast_skip_kv", [&] {
    const scalar_t* hp = hc.data_ptr<scalar_t>();
    // Norm statistics, shared by every layer (only the weights differ).
    std::vector<float> mean(R), rstd(R);
    at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        row_stats(hp + rows[r] * hidden, hidden, feps, rms, &mean[r], &rstd[r]);
    });

    std::vector<int64_t> active;  // indices into `rows` of the rows writing layer j
    active.reserve(R);
    for (int64_t j = 0; j < nl; ++j) {
      active.clear();
      for (int64_t r = 0; r < R; ++r)
        if (first == nullptr || first[rows[r]] <= j) active.push_back(r);
      const int64_t M = static_cast<int64_t>(active.size());
      if (M == 0) continue;

      at::Tensor x = h.new_empty({M, hidden});
      scalar_t* xp = x.data_ptr<scalar_t>();
      const float* wj = nw.data_ptr<float>() + j * hidden;
      const float* bj = nb.defined() ? nb.data_ptr<float>() + j * hidden : nullptr;
      at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)),
                       [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          const int64_t r = active[m];
          normalize_row(hp + rows[r] * hidden, hidden, mean[r], rstd[r], wj, bj, xp + m * hidden);
        }
      });

      std::optional<at::Tensor> bias_j;
      if (kv_bias.has_value()) bias_j = kv_bias->select(0, j);
      const at::Tensor kvq =  // [M, width]: K | V (| Q)
          linear(x, kv_weight.select(0, j), bias_j, "none", std::nullopt, std::nullopt).contiguous();
      const scalar_t* kvp = kvq.data_ptr<scalar_t>();

      // One head of d values, RoPE'd when the model uses it (rotate-half), to dst.
      auto write_head = [&](const scalar_t* src, scalar_t* dst, int64_t s_dim, int64_t r, bool rotate) {
        if (rotate) {
          const float* c = cos_t.data() + r * half;
          const float* sn = sin_t.data() + r * half;
          for (int64_t i = 0; i < half; ++i) {
            const float a = static_cast<float>(src[i]), b = static_cast<float>(src[i + half]);
            dst[i * s_dim] = static_cast<scalar_t>(a * c[i] + (-b) * sn[i]);
            dst[(i + half) * s_dim] = static_cast<scalar_t>(b * c[i] + a * sn[i]);
          }
        } else {
          for (int64_t i = 0; i < d; ++i) dst[i * s_dim] = src[i];
        }
      };
      const CacheView<scalar_t> kcv(k_cache, j), vcv(v_cache, j);
      const std::optional<CacheView<scalar_t>> qv =
          q_out.has_value() ? std::optional<CacheView<scalar_t>>(CacheView<scalar_t>(*q_out))
                            : std::nullopt;
      at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          const int64_t r = active[m], n = rows[r], slot = slots[n];
          const scalar_t* krow = kvp + m * width;
          for (int64_t hh = 0; slot >= 0 && hh < kv_heads; ++hh) {
            write_head(krow + hh * d, kcv.row(slot, hh), kcv.s_dim, r, rope);
            write_head(krow + kv_size + hh * d, vcv.row(slot, hh), vcv.s_dim, r, false);
          }
          for (int64_t hh = 0; hh < q_heads; ++hh)
            write_head(krow + 2 * kv_size + hh * d, qv->row(n, hh), qv->s_dim, r, rope);
        }
      });
    }
  });
}

}  // namespace anee_fast::cpu
