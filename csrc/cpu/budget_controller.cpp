// CPU implementation of anee_fast::budget_controller: the trained controller's proposal for every
// token (see ops/reference.py:budget_controller; features and rule in csrc/policy_rule.h). Per row,
// in float32: the row of h and h_prev as floats, the sums of the scalar features (8 partial sums
// each, which the compiler vectorises), the RMS-normalised row and its projection, the small MLP,
// then the rule.

#include <ATen/ops/empty.h>

#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "../policy_rule.h"
#include "cpu_common.h"

namespace anee_fast::cpu {

at::Tensor budget_controller(const at::Tensor& h, const at::Tensor& h_prev, const at::Tensor& budget,
                             const at::Tensor& budget_left, const at::Tensor& scalar_mean,
                             const at::Tensor& scalar_std, const at::Tensor& proj_weight,
                             const at::Tensor& inp_weight, const at::Tensor& inp_bias,
                             const at::Tensor& layer_weight, const at::Tensor& hidden_weight,
                             const at::Tensor& hidden_bias, const at::Tensor& out_weight,
                             const at::Tensor& out_bias, int64_t layer, int64_t num_layers,
                             double skip_cost, int64_t order_position, int64_t order_length,
                             double margin, double net_min_budget, double net_max_budget,
                             double exit_threshold) {
  for (const at::Tensor* t : {&h, &h_prev, &budget, &budget_left, &scalar_mean, &scalar_std,
                              &proj_weight, &inp_weight, &inp_bias, &layer_weight, &hidden_weight,
                              &hidden_bias, &out_weight, &out_bias})
    TORCH_CHECK(t->device().is_cpu(), "budget_controller: CPU implementation called with a ",
                t->device(), " tensor");
  const BudgetControllerSizes s = check_budget_controller_args(
      h, h_prev, budget, budget_left, scalar_mean, scalar_std, proj_weight, inp_weight, inp_bias,
      layer_weight, hidden_weight, hidden_bias, out_weight, out_bias, layer, num_layers, skip_cost,
      order_position, order_length);
  const BudgetRule rule = budget_rule(layer, num_layers, skip_cost, order_position, order_length,
                                      margin, net_min_budget, net_max_budget, exit_threshold);
  const int64_t N = s.N, H = s.hidden, P = s.proj_dim, W = s.width, I = kControllerFeatures + P;
  const at::Tensor hc = h.contiguous(), pc = h_prev.contiguous();
  const at::Tensor bud = budget.contiguous(), left = budget_left.contiguous();
  const at::Tensor mean_t = scalar_mean.contiguous(), std_t = scalar_std.contiguous();
  const at::Tensor proj_t = proj_weight.contiguous(), inp_w_t = inp_weight.contiguous();
  const at::Tensor inp_b_t = inp_bias.contiguous(), layer_t = layer_weight.contiguous();
  const at::Tensor hid_w_t = hidden_weight.contiguous(), hid_b_t = hidden_bias.contiguous();
  const at::Tensor out_w_t = out_weight.contiguous(), out_b_t = out_bias.contiguous();
  const float *mean_w = mean_t.data_ptr<float>(), *std_w = std_t.data_ptr<float>();
  const float *proj = proj_t.data_ptr<float>(), *inp_w = inp_w_t.data_ptr<float>();
  const float *inp_b = inp_b_t.data_ptr<float>(), *layer_b = layer_t.data_ptr<float>() + layer * W;
  const float *hid_w = hid_w_t.data_ptr<float>(), *hid_b = hid_b_t.data_ptr<float>();
  const float *out_w = out_w_t.data_ptr<float>(), out_b = out_b_t.data_ptr<float>()[0];
  const float *bud_p = bud.data_ptr<float>(), *left_p = left.data_ptr<float>();
  at::Tensor codes = at::empty({N}, h.options().dtype(at::kChar));
  int8_t* out = codes.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "anee_fast_budget_controller", [&] {
    const scalar_t* a = hc.data_ptr<scalar_t>();
    const scalar_t* b = pc.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)),
                     [&](int64_t begin, int64_t end) {
      std::vector<float> hf(H), pf(H), work(H), x(I), z(W), hid(W);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t i = 0; i < H; ++i) {
          hf[i] = static_cast<float>(a[n * H + i]);
          pf[i] = static_cast<float>(b[n * H + i]);
          work[i] = hf[i] - pf[i];
        }
        const float hh = dot(hf.data(), hf.data(), H), pp = dot(pf.data(), pf.data(), H);
        const float hp = dot(hf.data(), pf.data(), H), dd = dot(work.data(), work.data(), H);
        const float mean = lane_sum(hf.data(), H, [](float v) { return v; }) / H;
        const float centred =
            lane_sum(hf.data(), H, [mean](float v) { return (v - mean) * (v - mean); });
        const float rstd = 1.f / std::sqrt(hh / H + 1e-6f);
        for (int64_t i = 0; i < H; ++i) work[i] = hf[i] * rstd;   // the normalised row
        float f[kControllerFeatures];
        controller_scalars(hh, dd, centred / (H - 1), pp, hp, bud_p[n], left_p[n], rule, f);
        for (int k = 0; k < kControllerFeatures; ++k) x[k] = (f[k] - mean_w[k]) / std_w[k];
        for (int64_t p = 0; p < P; ++p) x[kControllerFeatures + p] = dot(work.data(), proj + p * H, H);
        for (int64_t j = 0; j < W; ++j)
          z[j] = std::max(dot(x.data(), inp_w + j * I, I) + inp_b[j] + layer_b[j], 0.f);
        for (int64_t j = 0; j < W; ++j)
          hid[j] = std::max(dot(z.data(), hid_w + j * W, W) + hid_b[j], 0.f);
        const float logit = dot(hid.data(), out_w, W) + out_b;
        out[n] = budget_controller_rule(logit, f[kAffordable], bud_p[n], left_p[n], rule);
      }
    });
  });
  return codes;
}

}  // namespace anee_fast::cpu
