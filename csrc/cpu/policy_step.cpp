// CPU implementation of anee_fast::policy_step: one layer of the depth policy's budget rule for
// every token (csrc/policy_rule.h; see ops/reference.py:policy_step).

#include "../op_checks.h"
#include "../ops.h"
#include "../policy_rule.h"
#include "cpu_common.h"

namespace anee_fast::cpu {

at::Tensor policy_step(const at::Tensor& proposed, at::Tensor& spent, at::Tensor& stopped,
                       const at::Tensor& allowed, const at::Tensor& limit, at::Tensor& budget_left,
                       at::Tensor& actions, int64_t layer, double commitment, double skip_cost,
                       int64_t stop_code, bool forced) {
  TORCH_CHECK(proposed.device().is_cpu() && spent.device().is_cpu() && stopped.device().is_cpu() &&
              allowed.device().is_cpu() && limit.device().is_cpu() &&
              budget_left.device().is_cpu() && actions.device().is_cpu(),
              "policy_step: CPU implementation called with non-CPU tensors");
  const int64_t N = check_policy_step_args(proposed, spent, stopped, allowed, limit, budget_left,
                                           actions, layer, stop_code);
  at::Tensor process = stopped.new_empty(stopped.sizes());
  const at::Tensor proposed_c = proposed.contiguous(), allowed_c = allowed.contiguous(),
                   limit_c = limit.contiguous();
  const int8_t* prop = proposed_c.data_ptr<int8_t>();
  const float* allow = allowed_c.data_ptr<float>();
  const float* lim = limit_c.data_ptr<float>();
  float* sp = spent.data_ptr<float>();
  bool* st = stopped.data_ptr<bool>();
  float* left = budget_left.data_ptr<float>();
  bool* out = process.data_ptr<bool>();
  int8_t* act = actions.data_ptr<int8_t>() + layer * actions.stride(1);
  const int64_t act_stride = actions.stride(0);
  const float num_layers = static_cast<float>(actions.size(1));
  for (int64_t n = 0; n < N; ++n) {
    const int8_t a = policy_rule(prop[n], sp + n, st + n, left + n, allow[n], lim[n], num_layers,
                                 static_cast<float>(commitment), static_cast<float>(skip_cost),
                                 static_cast<int8_t>(stop_code), forced, layer == 0);
    act[n * act_stride] = a;
    out[n] = a == kProcess;
  }
  return process;
}

}  // namespace anee_fast::cpu
