// CUDA implementation of anee_fast::policy_step: one layer of the depth policy's budget rule for
// every token (csrc/policy_rule.h; see ops/reference.py:policy_step), one thread per token. One
// launch where the unfused rule takes about a dozen.

#include "../op_checks.h"
#include "../ops.h"
#include "../policy_rule.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void policy_step_kernel(const int8_t* __restrict__ proposed, float* __restrict__ spent,
                                   bool* __restrict__ stopped, const float* __restrict__ allowed,
                                   const float* __restrict__ limit, float* __restrict__ budget_left,
                                   int8_t* __restrict__ actions, int64_t action_stride,
                                   bool* __restrict__ process, int64_t N, float num_layers,
                                   float commitment, float skip_cost, int8_t stop_code, bool forced,
                                   bool first) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int8_t a = policy_rule(proposed[n], spent + n, stopped + n, budget_left + n, allowed[n],
                               limit[n], num_layers, commitment, skip_cost, stop_code, forced,
                               first);
  actions[n * action_stride] = a;
  process[n] = a == kProcess;
}

}  // namespace

at::Tensor policy_step(const at::Tensor& proposed, at::Tensor& spent, at::Tensor& stopped,
                       const at::Tensor& allowed, const at::Tensor& limit, at::Tensor& budget_left,
                       at::Tensor& actions, int64_t layer, double commitment, double skip_cost,
                       int64_t stop_code, bool forced) {
  TORCH_CHECK(proposed.is_cuda(), "policy_step: CUDA implementation called with a ",
              proposed.device(), " tensor proposed");
  const int64_t N = check_policy_step_args(proposed, spent, stopped, allowed, limit, budget_left,
                                           actions, layer, stop_code);
  check_cuda(spent, proposed, "policy_step", "spent");
  check_cuda(stopped, proposed, "policy_step", "stopped");
  check_cuda(allowed, proposed, "policy_step", "allowed");
  check_cuda(limit, proposed, "policy_step", "limit");
  check_cuda(budget_left, proposed, "policy_step", "budget_left");
  check_cuda(actions, proposed, "policy_step", "actions");
  const c10::cuda::CUDAGuard guard(proposed.device());
  at::Tensor process = stopped.new_empty(stopped.sizes());
  if (N == 0) return process;
  const at::Tensor proposed_c = proposed.contiguous(), allowed_c = allowed.contiguous(),
                   limit_c = limit.contiguous();
  const unsigned blocks = static_cast<unsigned>((N + kThreads - 1) / kThreads);
  policy_step_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      proposed_c.data_ptr<int8_t>(), spent.data_ptr<float>(), stopped.data_ptr<bool>(),
      allowed_c.data_ptr<float>(), limit_c.data_ptr<float>(), budget_left.data_ptr<float>(),
      actions.data_ptr<int8_t>() + layer * actions.stride(1), actions.stride(0),
      process.data_ptr<bool>(), N, static_cast<float>(actions.size(1)),
      static_cast<float>(commitment), static_cast<float>(skip_cost),
      static_cast<int8_t>(stop_code), forced, layer == 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return process;
}

}  // namespace anee_fast::cuda
