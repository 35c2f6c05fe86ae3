// CPU implementation of anee_fast::skip_kv, one layer's SKIP path for the rows h [N, hidden]:
// norm -> K|V projection -> RoPE on K -> cache write at slot_mapping (see
// ops/reference.py:skip_kv); rows with slot -1 write nothing at all. With q_out kv_weight holds
// K | V | Q rows and every row's query, RoPE'd like K, goes to q_out: a PROCESS row's whole QKV
// projection.
//
// Only the rows that write are normalised and projected (a CPU op may read the slot mapping on
// the host: that is row compaction for free), every row when queries are asked for. The caches
// are one layer of the whole cache (views): writes land in the given tensors, through their
// strides. kv_weight may be quantized (weight_format): the projection is linear's, whose
// kernels decode it.
#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {

void skip_kv(const at::Tensor& h, const at::Tensor& norm_weight,
             const std::optional<at::Tensor>& norm_bias, const at::Tensor& kv_weight,
             const std::optional<at::Tensor>& kv_bias, const at::Tensor& positions,
             const std::optional<at::Tensor>& inv_freq, double rope_scale, at::Tensor& k_cache,
             at::Tensor& v_cache, const at::Tensor& slot_mapping, double eps, bool rms,
             const std::optional<at::Tensor>& q_out, c10::string_view weight_format) {
  TORCH_CHECK(h.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
              kv_weight.device().is_cpu() && (!q_out.has_value() || q_out->device().is_cpu()),
              "skip_kv: CPU implementation called with non-CPU tensors");
  const SkipKvSizes sizes = check_skip_kv_args(h, norm_weight, norm_bias, kv_weight, kv_bias,
                                               positions, inv_freq, k_cache, v_cache,
                                               slot_mapping, q_out, weight_format);
  const int64_t N = sizes.N, hidden = sizes.hidden, num_slots = sizes.num_slots;
  const int64_t kv_heads = sizes.kv_heads, d = sizes.d, kv_size = kv_heads * d;
  const bool rope = inv_freq.has_value();

  const at::Tensor slots_t = index_tensor(slot_mapping, "slot_mapping");
  const int64_t* slots = slots_t.data_ptr<int64_t>();
  check_slots(slots, N, num_slots);

  // Rows to project: those with a slot, or every row when queries are asked for.
  std::vector<int64_t> rows;
  rows.reserve(N);
  for (int64_t n = 0; n < N; ++n)
    if (q_out.has_value() || slots[n] >= 0) rows.push_back(n);
  if (rows.empty()) return;
  const int64_t q_heads = sizes.q_heads, width = 2 * kv_size + q_heads * d;

  const at::Tensor hc = h.contiguous();
  const at::Tensor nw = float_tensor(norm_weight);
  const at::Tensor nb = norm_bias.has_value() ? float_tensor(*norm_bias) : at::Tensor();
  const float feps = static_cast<float>(eps);

  // RoPE tables of the projected rows: cos/sin of position * inv_freq (float32), times rope_scale.
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
    at::Tensor x = h.new_empty({R, hidden});
    scalar_t* xp = x.data_ptr<scalar_t>();
    const float* nwp = nw.data_ptr<float>();
    const float* nbp = nb.defined() ? nb.data_ptr<float>() : nullptr;
    at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float mean, rstd;
        row_stats(hp + rows[r] * hidden, hidden, feps, rms, &mean, &rstd);
        normalize_row(hp + rows[r] * hidden, hidden, mean, rstd, nwp, nbp, xp + r * hidden);
      }
    });

    const at::Tensor kvq =  // [R, width]: K | V (| Q)
        linear(x, kv_weight, kv_bias, "none", std::nullopt, std::nullopt, weight_format)
            .contiguous();
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
    const CacheView<scalar_t> kcv(k_cache), vcv(v_cache);
    const std::optional<CacheView<scalar_t>> qv =
        q_out.has_value() ? std::optional<CacheView<scalar_t>>(CacheView<scalar_t>(*q_out))
                          : std::nullopt;
    at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = rows[r], slot = slots[n];
        const scalar_t* krow = kvp + r * width;
        for (int64_t hh = 0; slot >= 0 && hh < kv_heads; ++hh) {
          write_head(krow + hh * d, kcv.row(slot, hh), kcv.s_dim, r, rope);
          write_head(krow + kv_size + hh * d, vcv.row(slot, hh), vcv.s_dim, r, false);
        }
        for (int64_t hh = 0; hh < q_heads; ++hh)
          write_head(krow + 2 * kv_size + hh * d, qv->row(n, hh), qv->s_dim, r, rope);
      }
    });
  });
}

}  // namespace anee_fast::cpu
