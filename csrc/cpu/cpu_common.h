// Helpers shared by the CPU implementations of the anee_fast ops (csrc/cpu/*.cpp).
// Everything is computed in float32 and stored in the tensors' own dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace anee_fast::cpu {

// A read-only int64 copy of an index tensor (slot mappings, positions, block tables, ...).
inline at::Tensor index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()), name, " must be an integer tensor");
  return t.to(at::kLong).contiguous();
}

// A read-only float32 contiguous copy (norm weights, biases, inv_freq).
inline at::Tensor float_tensor(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

// sum_i f(x[i]) in float32 with 8 independent partial sums, so that the compiler can vectorise
// the reduction (one running sum fixes the order and serialises every add).
template <typename scalar_t, typename F>
inline float lane_sum(const scalar_t* x, int64_t n, F f) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += f(static_cast<float>(x[i + l]));
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += f(static_cast<float>(x[i]));
  return s;
}

// Per-row normalisation statistics of x[rows, D]: y = (x - mean) * rstd (mean = 0 for RMSNorm;
// LayerNorm uses the centred variance, like torch).
template <typename scalar_t>
inline void row_stats(const scalar_t* x, int64_t D, float eps, bool rms, float* mean,
                      float* rstd) {
  if (rms) {
    *mean = 0.f;
    *rstd = 1.f / std::sqrt(lane_sum(x, D, [](float v) { return v * v; }) / D + eps);
  } else {
    const float mu = lane_sum(x, D, [](float v) { return v; }) / D;
    const float var = lane_sum(x, D, [mu](float v) { return (v - mu) * (v - mu); }) / D;
    *mean = mu;
    *rstd = 1.f / std::sqrt(var + eps);
  }
}

// out = (x - mean) * rstd * w (+ b), in float32, stored as scalar_t.
template <typename scalar_t>
inline void normalize_row(const scalar_t* x, int64_t D, float mean, float rstd, const float* w,
                          const float* b, scalar_t* out) {
  if (b == nullptr) {
    for (int64_t i = 0; i < D; ++i)
      out[i] = static_cast<scalar_t>((static_cast<float>(x[i]) - mean) * rstd * w[i]);
  } else {
    for (int64_t i = 0; i < D; ++i)
      out[i] = static_cast<scalar_t>((static_cast<float>(x[i]) - mean) * rstd * w[i] + b[i]);
  }
}

// sum_i a[i] * b[i] in float32, with 8 independent partial sums so that the compiler can
// vectorise the reduction (the order of a float sum is otherwise fixed by the language).
template <typename scalar_t>
inline float dot(const float* a, const scalar_t* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * static_cast<float>(b[i + l]);
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

// Strided 3-D view of one layer's cache [slots, kv_heads, head_dim], or of q_out [N, heads,
// head_dim] (writes land in place).
template <typename scalar_t>
struct CacheView {
  scalar_t* data;
  int64_t s_slot, s_head, s_dim;

  explicit CacheView(const at::Tensor& c)
      : data(c.data_ptr<scalar_t>()), s_slot(c.stride(0)), s_head(c.stride(1)), s_dim(c.stride(2)) {}
  scalar_t* row(int64_t slot, int64_t head) const { return data + slot * s_slot + head * s_head; }
};

// Checks every slot is -1 or a valid index into a cache with `num_slots` slots.
inline void check_slots(const int64_t* slots, int64_t n, int64_t num_slots) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slots[i] >= -1 && slots[i] < num_slots, "slot_mapping[", i, "] = ", slots[i],
                " is out of range for a cache of ", num_slots, " slots");
  }
}

}  // namespace anee_fast::cpu
