// CPU implementation of anee_fast::skip_adapter, the SKIP path's low-rank correction of the rows
// h [N, hidden]: out = h + up_weight (down_weight norm(h)) + up_bias where row_mask holds, h bit
// for bit on the other rows (see ops/reference.py:skip_adapter). Each step rounds to h's dtype,
// as the reference's separate ops do.
//
// A CPU op may read the mask on the host: only the rows that take the adapter are normalised and
// projected, so the cost scales with them; the others are a copy of h. Up to kMaxRows such rows
// (decode) the two projections are cpu_common.h's GEMVs, parallel over their output features
// (the rank, then the hidden dim), each weight row read once for all rows. More rows are the
// linear op's products on the gathered rows, as are quantized adapters (its quantized GEMVs),
// float64 and CPUs without AVX2.
#include <ATen/Dispatch_v2.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>

#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {
namespace {

// Adapter rows up to which the GEMVs are at least on par with at::linear (python/bench_kernels.py
// --ops skip_adapter, 2-core development machine, float32: 2.3-4.1x at 1 row, 1.0-1.1x at 16).
constexpr int64_t kMaxRows = 16;

template <typename scalar_t>
inline float rounded(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}

// The adapter of the rows `rows` of out (which holds h), written over them in place.
template <typename scalar_t>
void adapter_gemv(at::Tensor& out, const std::vector<int64_t>& rows, const at::Tensor& norm_w,
                  const at::Tensor& norm_b, const at::Tensor& down, const at::Tensor& up,
                  const at::Tensor& up_bias, float eps, bool rms) {
  const int64_t R = static_cast<int64_t>(rows.size());
  const int64_t hidden = out.size(1), rank = down.size(0);
  scalar_t* o = out.data_ptr<scalar_t>();
  const float* nw = norm_w.data_ptr<float>();
  const float* nb = norm_b.defined() ? norm_b.data_ptr<float>() : nullptr;
  const scalar_t* ub = up_bias.defined() ? up_bias.data_ptr<scalar_t>() : nullptr;
  // x = norm(h) [R, hidden], z = x down^T [R, rank], y = z up^T [R, hidden]: float32, x and z
  // holding values of scalar_t (the reference's roundings).
  std::vector<float> x(R * hidden), z(R * rank), y(R * hidden);

  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* hr = o + rows[r] * hidden;
      float mean, rstd;
      row_stats(hr, hidden, eps, rms, &mean, &rstd);
      float* xr = x.data() + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = (static_cast<float>(hr[i]) - mean) * rstd * nw[i];
        xr[i] = rounded<scalar_t>(nb == nullptr ? v : v + nb[i]);
      }
    }
  });
  gemv(x.data(), R, hidden, down.data_ptr<scalar_t>(), down.stride(0), rank, z.data());
  for (float& v : z) v = rounded<scalar_t>(v);
  gemv(z.data(), R, rank, up.data_ptr<scalar_t>(), up.stride(0), hidden, y.data());
  for (int64_t r = 0; r < R; ++r) {
    scalar_t* out_r = o + rows[r] * hidden;
    const float* yr = y.data() + r * hidden;
    for (int64_t j = 0; j < hidden; ++j) {
      const float yj = rounded<scalar_t>(ub == nullptr ? yr[j] : yr[j] + static_cast<float>(ub[j]));
      out_r[j] = static_cast<scalar_t>(static_cast<float>(out_r[j]) + yj);
    }
  }
}

}  // namespace

at::Tensor skip_adapter(const at::Tensor& h, const at::Tensor& norm_weight,
                        const std::optional<at::Tensor>& norm_bias, const at::Tensor& down_weight,
                        const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                        const at::Tensor& row_mask, double eps, bool rms,
                        c10::string_view weight_format) {
  TORCH_CHECK(h.device().is_cpu() && norm_weight.device().is_cpu() &&
              (!norm_bias.has_value() || norm_bias->device().is_cpu()) &&
              down_weight.device().is_cpu() && up_weight.device().is_cpu() &&
              (!up_bias.has_value() || up_bias->device().is_cpu()),
              "skip_adapter: CPU implementation called with non-CPU tensors");
  const SkipAdapterSizes sizes = check_skip_adapter_args(h, norm_weight, norm_bias, down_weight,
                                                         up_weight, up_bias, row_mask, weight_format);
  at::Tensor out = h.clone(at::MemoryFormat::Contiguous);   // the rows without the adapter

  const at::Tensor mask = row_mask.contiguous();
  const bool* m = mask.data_ptr<bool>();
  std::vector<int64_t> rows;
  for (int64_t n = 0; n < h.size(0); ++n)
    if (m[n]) rows.push_back(n);
  if (rows.empty()) return out;

  const at::ScalarType dtype = h.scalar_type();
  const bool gemv_dtype = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  if (sizes.format != WeightFormat::kDense || static_cast<int64_t>(rows.size()) > kMaxRows ||
      !gemv_dtype || !has_avx2_fma()) {
    // The adapter rows gathered, then the two products as the linear op computes them (its
    // quantized GEMVs or dequantized GEMMs: float32 from the weight's values, rounded to h's dtype).
    const at::Tensor index =
        at::from_blob(rows.data(), {static_cast<int64_t>(rows.size())}, at::kLong);
    at::Tensor hr = out.index_select(0, index);
    const at::Tensor z = linear(norm(hr, norm_weight, norm_bias, eps, rms), down_weight,
                                std::nullopt, "none", std::nullopt, std::nullopt, weight_format);
    out.index_copy_(0, index, hr.add_(linear(z, up_weight, up_bias, "none", std::nullopt,
                                             std::nullopt, weight_format)));
    return out;
  }
  const at::Tensor nw = float_tensor(norm_weight);
  const at::Tensor nb = norm_bias.has_value() ? float_tensor(*norm_bias) : at::Tensor();
  const at::Tensor down = down_weight.stride(1) == 1 ? down_weight : down_weight.contiguous();
  const at::Tensor up = up_weight.stride(1) == 1 ? up_weight : up_weight.contiguous();
  const at::Tensor ub = up_bias.has_value() ? up_bias->contiguous() : at::Tensor();
  AT_DISPATCH_V2(dtype, "anee_fast_skip_adapter", AT_WRAP([&] {
    adapter_gemv<scalar_t>(out, rows, nw, nb, down, up, ub, static_cast<float>(eps), rms);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

}  // namespace anee_fast::cpu
