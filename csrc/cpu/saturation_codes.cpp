// CPU implementation of anee_fast::saturation_codes: the saturation heuristic's proposal for
// every token (csrc/policy_rule.h; see ops/reference.py:saturation_codes). One pass over each row
// of h and h_prev: whether they differ, and the float32 sums of the cosine.

#include <ATen/ops/empty.h>

#include "../op_checks.h"
#include "../ops.h"
#include "../policy_rule.h"
#include "cpu_common.h"

namespace anee_fast::cpu {

at::Tensor saturation_codes(const at::Tensor& h, const at::Tensor& h_prev,
                            const at::Tensor& budget_left, double skip_saturation,
                            double exit_saturation, double exit_threshold) {
  TORCH_CHECK(h.device().is_cpu() && h_prev.device().is_cpu() && budget_left.device().is_cpu(),
              "saturation_codes: CPU implementation called with non-CPU tensors");
  const int64_t N = check_saturation_codes_args(h, h_prev, budget_left);
  const int64_t H = h.size(1);
  const at::Tensor hc = h.contiguous(), pc = h_prev.contiguous(), left = budget_left.contiguous();
  at::Tensor codes = at::empty({N}, h.options().dtype(at::kChar));
  int8_t* out = codes.data_ptr<int8_t>();
  const float* bl = left.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "anee_fast_saturation_codes", [&] {
    const scalar_t* a = hc.data_ptr<scalar_t>();
    const scalar_t* b = pc.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* x = a + n * H;
        const scalar_t* y = b + n * H;
        bool moved = false;
        float w11 = 0.f, w22 = 0.f, w12 = 0.f;
        for (int64_t i = 0; i < H; ++i) {
          const float u = static_cast<float>(x[i]), v = static_cast<float>(y[i]);
          moved = moved || u != v;
          w11 += u * u;
          w22 += v * v;
          w12 += u * v;
        }
        out[n] = saturation_rule(moved, w11, w22, w12, bl[n], static_cast<float>(skip_saturation),
                                 static_cast<float>(exit_saturation), static_cast<float>(exit_threshold));
      }
    });
  });
  return codes;
}

}  // namespace anee_fast::cpu
