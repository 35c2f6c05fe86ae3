// Decision rules for one token at one layer, shared by the CPU and CUDA kernels so that both
// apply the same arithmetic: the depth policy's budget rule (ops/reference.py:policy_step: float32,
// in the reference's order, since a decision at a budget boundary must not differ) and the
// saturation heuristic's proposal (ops/reference.py:saturation_codes).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ANEE_FAST_HOST_DEVICE __host__ __device__
#else
#define ANEE_FAST_HOST_DEVICE
#endif

namespace anee_fast {

constexpr int8_t kProcess = 0, kSkip = 1, kExit = 2;   // anee_fast/actions.py

// Returns the action the token takes; updates its spent compute and its stopped flag. The first
// layer starts them (zero, false) instead of reading them.
ANEE_FAST_HOST_DEVICE inline int8_t policy_rule(int8_t proposed, float* spent, bool* stopped,
                                                float allowed, float commitment, float skip_cost,
                                                int8_t stop_code, bool forced, bool first) {
  if (first) {
    *spent = 0.f;
    *stopped = false;
  }
  int8_t action = kProcess;
  if (!forced) {
    const bool broke = proposed == kProcess && *spent + commitment > allowed;
    *stopped = *stopped || proposed == kExit || broke;
    action = *stopped ? stop_code : proposed;
  }
  *spent += action == kProcess ? 1.f : skip_cost;
  return action;
}

// The heuristic's code from a row's sums: whether h and h_prev differ anywhere, sum h^2,
// sum h_prev^2, sum h * h_prev (float32), and its budget_left. The cosine divides by the norms
// clamped at 1e-8, like torch's cosine_similarity.
ANEE_FAST_HOST_DEVICE inline int8_t saturation_rule(bool moved, float w11, float w22, float w12,
                                                    float budget_left, float skip_saturation,
                                                    float exit_saturation, float exit_threshold) {
  const float n1 = fmaxf(sqrtf(w11), 1e-8f), n2 = fmaxf(sqrtf(w22), 1e-8f);
  const float cos = w12 / (n1 * n2);
  if ((moved && cos >= exit_saturation) || budget_left < exit_threshold) return kExit;
  return moved && cos >= skip_saturation ? kSkip : kProcess;
}

}  // namespace anee_fast
