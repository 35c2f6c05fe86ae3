// Decision rules for one token at one layer, shared by the CPU and CUDA kernels so that both
// apply the same arithmetic: the depth policy's budget rule (ops/reference.py:policy_step: float32,
// in the reference's order, since a decision at a budget boundary must not differ), the
// saturation heuristic's proposal (ops/reference.py:saturation_codes) and the trained
// controller's features and rule (ops/reference.py:budget_controller).
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

// Returns the action the token takes; updates its spent compute and its stopped flag (the first
// layer starts them, zero and false, instead of reading them), then writes its budget left,
// (limit - spent) / L: what the next layer's controller reads.
ANEE_FAST_HOST_DEVICE inline int8_t policy_rule(int8_t proposed, float* spent, bool* stopped,
                                                float* budget_left, float allowed, float limit,
                                                float num_layers, float commitment,
                                                float skip_cost, int8_t stop_code, bool forced,
                                                bool first) {
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
  *budget_left = (limit - *spent) / num_layers;
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

// a * b rounded once: on the device the intrinsic keeps the compiler from contracting it with a
// following add into an FMA, which the reference (one tensor op per step) never does.
ANEE_FAST_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

constexpr int kControllerFeatures = 8;   // ops/reference.py:CONTROLLER_FEATURES
constexpr int kAffordable = 6;           // the clamped affordable fraction's index among them

// budget_controller's per-call numbers, each computed in double on the host and rounded to
// float32 once, as the reference's tensor ops take their Python scalars.
struct BudgetRule {
  float num_layers;        // L
  float remaining_cost;    // (L - layer) * skip_cost: the remaining layers as SKIPs
  float remaining_share;   // (L - layer) * (1 - skip_cost)
  float layers_left;       // (L - layer) / L, a feature
  float fixed_layers;      // L - D: the layers the static set always runs (D: its order's length)
  float order_cost;        // D * skip_cost
  float process_share;     // 1 - skip_cost: what a PROCESS costs over a SKIP
  float margin;            // the static fallback's; < 0: no fallback
  float net_min_budget;    // tokens whose budget is outside [net_min_budget, net_max_budget]
  float net_max_budget;    // follow the static set (with a fallback)
  float exit_threshold;
  int order_position;      // this layer's place in the static order, -1 if not in it
  int order_length;        // D
};

inline BudgetRule budget_rule(int64_t layer, int64_t num_layers, double skip_cost,
                              int64_t order_position, int64_t order_length, double margin,
                              double net_min_budget, double net_max_budget,
                              double exit_threshold) {
  const double L = static_cast<double>(num_layers), remaining = L - static_cast<double>(layer);
  const double D = static_cast<double>(order_length);
  return {static_cast<float>(L), static_cast<float>(remaining * skip_cost),
          static_cast<float>(remaining * (1.0 - skip_cost)), static_cast<float>(remaining / L),
          static_cast<float>(L - D), static_cast<float>(D * skip_cost),
          static_cast<float>(1.0 - skip_cost), static_cast<float>(margin),
          static_cast<float>(net_min_budget), static_cast<float>(net_max_budget),
          static_cast<float>(exit_threshold), static_cast<int>(order_position),
          static_cast<int>(order_length)};
}

// The controller's eight scalar features (CONTROLLER_FEATURES order) of a row from its float32
// sums: sum h^2, sum (h - h_prev)^2, the unbiased variance of h, sum h_prev^2, sum h * h_prev.
// The cosine divides by the norms clamped at 1e-8, like torch's cosine_similarity.
ANEE_FAST_HOST_DEVICE inline void controller_scalars(float hh, float dd, float var, float pp,
                                                     float hp, float budget, float budget_left,
                                                     const BudgetRule& r, float* out) {
  const float n1 = sqrtf(hh), n2 = sqrtf(pp);
  const float affordable = (mul_rn(budget_left, r.num_layers) - r.remaining_cost) / r.remaining_share;
  out[0] = log1pf(n1);
  out[1] = log1pf(sqrtf(dd));
  out[2] = log1pf(var);
  out[3] = hp / (fmaxf(n1, 1e-8f) * fmaxf(n2, 1e-8f));
  out[4] = budget;
  out[5] = budget_left;
  out[kAffordable] = fminf(fmaxf(affordable, -1.f), 2.f);
  out[7] = r.layers_left;
}

// The controller's code from the net's logit and the row's clamped affordable fraction: the
// static fallback where |logit| <= margin or the budget is outside [net_min_budget,
// net_max_budget] (margin >= 0), PROCESS where the token can pay for every remaining layer,
// EXIT under the threshold.
ANEE_FAST_HOST_DEVICE inline int8_t budget_controller_rule(float logit, float affordable,
                                                           float budget, float budget_left,
                                                           const BudgetRule& r) {
  if (budget_left < r.exit_threshold) return kExit;
  bool process = logit > 0.f;
  if (r.margin >= 0.f && (!(fabsf(logit) > r.margin) || budget < r.net_min_budget ||
                          budget > r.net_max_budget)) {
    const float limit = mul_rn(budget, r.num_layers) - r.fixed_layers - r.order_cost;
    const float processable = fminf(fmaxf(floorf(limit / r.process_share + 1e-6f), 0.f),
                                    static_cast<float>(r.order_length));
    process = r.order_position < 0 ||
              r.order_position >= r.order_length - static_cast<int>(processable);
  }
  constexpr float kFree = static_cast<float>(1.0 - 1e-6);
  return process || affordable >= kFree ? kProcess : kSkip;
}

}  // namespace anee_fast
