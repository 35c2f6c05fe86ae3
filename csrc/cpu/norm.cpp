// CPU implementation of anee_fast::norm: RMSNorm (rms=true) or LayerNorm over the last dim,
// computed in float32, returned in x's dtype (see ops/reference.py:norm).

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {

at::Tensor norm(const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, double eps, bool rms) {
  const int64_t D = check_norm_args(x, weight, bias);
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = float_tensor(weight);
  const at::Tensor b = bias.has_value() ? float_tensor(*bias) : at::Tensor();
  at::Tensor out = x.new_empty(x.sizes());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (rows == 0) return out;
  const float feps = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "anee_fast_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float mean, rstd;
        row_stats(xp + r * D, D, feps, rms, &mean, &rstd);
        normalize_row(xp + r * D, D, mean, rstd, wp, bp, op + r * D);
      }
    });
  });
  return out;
}

}  // namespace anee_fast::cpu
