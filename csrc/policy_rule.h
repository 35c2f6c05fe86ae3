// The depth policy's budget rule for one token at one layer (reference_ops.policy_step), shared
// by the CPU and CUDA kernels of anee_fast::policy_step so that both apply the same arithmetic
// (float32, in the reference's order: a decision at a budget boundary must not differ).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ANEE_FAST_HOST_DEVICE __host__ __device__
#else
#define ANEE_FAST_HOST_DEVICE
#endif

namespace anee_fast {

constexpr int8_t kProcess = 0, kExit = 2;   // anee_fast/actions.py

// Returns the action the token takes; updates its spent compute and its stopped flag.
ANEE_FAST_HOST_DEVICE inline int8_t policy_rule(int8_t proposed, float* spent, bool* stopped,
                                                float allowed, float commitment, float skip_cost,
                                                int8_t stop_code, bool forced) {
  int8_t action = kProcess;
  if (!forced) {
    const bool broke = proposed == kProcess && *spent + commitment > allowed;
    *stopped = *stopped || proposed == kExit || broke;
    action = *stopped ? stop_code : proposed;
  }
  *spent += action == kProcess ? 1.f : skip_cost;
  return action;
}

}  // namespace anee_fast
