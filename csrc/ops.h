// Declarations of the anee_fast op implementations. Schemas: torch_bindings.cpp; semantics:
// anee_fast/ops/reference.py. Light on purpose (only the Tensor header): each csrc/cpu/*.cpp
// and csrc/cuda/*.cu compiles without the dispatcher/registration headers, which only
// torch_bindings.cpp includes.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

// The ops, declared once and expanded in each device namespace below.
#define ANEE_FAST_DECLARE_OPS                                                                     \
  at::Tensor norm(const at::Tensor& x, const at::Tensor& weight,                                  \
                  const std::optional<at::Tensor>& bias, double eps, bool rms);                   \
                                                                                                  \
  std::tuple<at::Tensor, at::Tensor> add_norm(const at::Tensor& x, const at::Tensor& residual,    \
                                               const at::Tensor& weight,                          \
                                               const std::optional<at::Tensor>& bias, double eps, \
                                               bool rms);                                         \
                                                                                                  \
  at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,                                \
                    const std::optional<at::Tensor>& bias, c10::string_view activation,           \
                    const std::optional<at::Tensor>& residual,                                    \
                    const std::optional<at::Tensor>& row_mask,                                    \
                    c10::string_view weight_format);                                              \
                                                                                                  \
  void skip_kv(const at::Tensor& h, const at::Tensor& norm_weight,                                \
               const std::optional<at::Tensor>& norm_bias, const at::Tensor& kv_weight,           \
               const std::optional<at::Tensor>& kv_bias, const at::Tensor& positions,             \
               const std::optional<at::Tensor>& inv_freq, double rope_scale,                      \
               at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,          \
               double eps, bool rms, const std::optional<at::Tensor>& q_out,                      \
               c10::string_view weight_format);                                                   \
                                                                                                  \
  at::Tensor skip_adapter(const at::Tensor& h, const at::Tensor& norm_weight,                     \
                          const std::optional<at::Tensor>& norm_bias,                             \
                          const at::Tensor& down_weight, const at::Tensor& up_weight,             \
                          const std::optional<at::Tensor>& up_bias, const at::Tensor& row_mask,   \
                          double eps, bool rms, c10::string_view weight_format);                  \
                                                                                                  \
  at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,                      \
                             const at::Tensor& v_cache, const at::Tensor& block_tables,           \
                             const at::Tensor& seq_idx, const at::Tensor& positions,              \
                             int64_t block_size, double scale, int64_t sliding_window);          \
                                                                                                  \
  at::Tensor policy_step(const at::Tensor& proposed, at::Tensor& spent, at::Tensor& stopped,      \
                         const at::Tensor& allowed, const at::Tensor& limit,                      \
                         at::Tensor& budget_left, at::Tensor& actions, int64_t layer,             \
                         double commitment, double skip_cost, int64_t stop_code, bool forced);   \
                                                                                                  \
  at::Tensor saturation_codes(const at::Tensor& h, const at::Tensor& h_prev,                      \
                              const at::Tensor& budget_left, double skip_saturation,             \
                              double exit_saturation, double exit_threshold);                    \
                                                                                                  \
  at::Tensor budget_controller(                                                                   \
      const at::Tensor& h, const at::Tensor& h_prev, const at::Tensor& budget,                    \
      const at::Tensor& budget_left, const at::Tensor& scalar_mean, const at::Tensor& scalar_std, \
      const at::Tensor& proj_weight, const at::Tensor& inp_weight, const at::Tensor& inp_bias,    \
      const at::Tensor& layer_weight, const at::Tensor& hidden_weight,                            \
      const at::Tensor& hidden_bias, const at::Tensor& out_weight, const at::Tensor& out_bias,    \
      int64_t layer, int64_t num_layers, double skip_cost, int64_t order_position,                \
      int64_t order_length, double margin, double net_min_budget, double net_max_budget,         \
      double exit_threshold);

// CPU implementations (csrc/cpu/*.cpp).
namespace anee_fast::cpu {
ANEE_FAST_DECLARE_OPS
}  // namespace anee_fast::cpu

#ifdef ANEE_FAST_WITH_CUDA
// CUDA implementations (csrc/cuda/*.cu, compiled only when setup.py finds nvcc).
namespace anee_fast::cuda {
ANEE_FAST_DECLARE_OPS
}  // namespace anee_fast::cuda
#endif  // ANEE_FAST_WITH_CUDA

#undef ANEE_FAST_DECLARE_OPS
