// CPU implementation of anee_fast::add_norm: s = x + residual (stored in x's dtype), then
// RMSNorm / LayerNorm of s in float32 (see ops/reference.py:add_norm). One pass writes s, the norm
// reads it back while the row is still in cache.

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {

std::tuple<at::Tensor, at::Tensor> add_norm(const at::Tensor& x, const at::Tensor& residual,
                                            const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, double eps,
                                            bool rms) {
  const int64_t D = check_add_norm_args(x, residual, weight, bias);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor w = float_tensor(weight);
  const at::Tensor b = bias.has_value() ? float_tensor(*bias) : at::Tensor();
  at::Tensor sum = x.new_empty(x.sizes()), out = x.new_empty(x.sizes());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (rows == 0) return {sum, out};
  const float feps = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "anee_fast_add_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* rp = rc.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* s = sp + r * D;
        for (int64_t i = 0; i < D; ++i)   // rounded to scalar_t like torch's add
          s[i] = static_cast<scalar_t>(static_cast<float>(xp[r * D + i]) +
                                       static_cast<float>(rp[r * D + i]));
        float mean, rstd;
        row_stats(s, D, feps, rms, &mean, &rstd);
        normalize_row(s, D, mean, rstd, wp, bp, op + r * D);
      }
    });
  });
  return {sum, out};
}

}  // namespace anee_fast::cpu
