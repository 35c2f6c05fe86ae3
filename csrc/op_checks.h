// Argument checks of the anee_fast ops that do not depend on the device: shapes, dtypes and the
// sizes the kernels need. Both implementations of an op (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu)
// call the same check here, so a bad call fails with the same message on every device; the
// device checks (CPU vs CUDA, same device) stay in each implementation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace anee_fast {

// norm: returns D, the size of x's last dim (the normalised one).
inline int64_t check_norm_args(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "norm: x must have at least one dimension");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "norm: weight has ", weight.numel(), " elements, expected ", D);
  TORCH_CHECK(!bias.has_value() || bias->numel() == D, "norm: bias has ", bias->numel(),
              " elements, expected ", D);
  return D;
}

// add_norm: x and residual of one shape and dtype, then norm's checks; returns D.
inline int64_t check_add_norm_args(const at::Tensor& x, const at::Tensor& residual,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_norm: x ", x.sizes(), " and residual ",
              residual.sizes(), " differ in shape");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(),
              "add_norm: x and residual must have the same dtype");
  return check_norm_args(x, weight, bias);
}

// linear's epilogue after x @ weight^T + bias (see ops/reference.py:linear).
enum class Activation { kNone, kGeluTanh, kSiluGated };

inline Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu_gated") return Activation::kSiluGated;
  TORCH_CHECK(false, "linear: activation must be none, gelu_tanh or silu_gated, got ", name);
  return Activation::kNone;
}

// How a weight matrix [N, K] is stored (layouts: anee_fast/ops/weight_formats.py). kDense is a
// float tensor [N, K] (float32, bfloat16 or float16, not necessarily x's dtype); the others are
// uint8 tensors [N, row_bytes] whose rows hold one output feature each: kInt8 a float32 scale
// (4 bytes, little endian) then K int8 values; kQ4_0, kQ4_1, kQ8_0 the GGUF blocks of 32 values
// (18, 20 and 34 bytes). Kernels dequantize in float32 and accumulate in float32.
enum class WeightFormat { kDense, kInt8, kQ4_0, kQ4_1, kQ8_0 };

inline WeightFormat parse_weight_format(c10::string_view name, const char* op) {
  if (name == "dense") return WeightFormat::kDense;
  if (name == "int8") return WeightFormat::kInt8;
  if (name == "q4_0") return WeightFormat::kQ4_0;
  if (name == "q4_1") return WeightFormat::kQ4_1;
  if (name == "q8_0") return WeightFormat::kQ8_0;
  TORCH_CHECK(false, op, ": weight_format must be dense, int8, q4_0, q4_1 or q8_0, got ", name);
  return WeightFormat::kDense;
}

constexpr int64_t kQuantBlock = 32;   // values per GGUF block

// Bytes of one GGUF block (kQuantBlock values) of a block format.
inline int64_t block_bytes(WeightFormat f) {
  switch (f) {
    case WeightFormat::kQ4_0: return 18;   // float16 d, 16 bytes of 4-bit q: w = d * (q - 8)
    case WeightFormat::kQ4_1: return 20;   // float16 d, float16 m, 16 bytes of q: w = d * q + m
    case WeightFormat::kQ8_0: return 34;   // float16 d, 32 int8 q: w = d * q
    default: return 0;
  }
}

// Bytes of one stored row of K input features (quantized formats).
inline int64_t weight_row_bytes(WeightFormat f, int64_t K) {
  return f == WeightFormat::kInt8 ? 4 + K : (K / kQuantBlock) * block_bytes(f);
}

// A weight of `rows` x K in format f: dense [rows, K] floating, or uint8 [rows, row_bytes] with
// contiguous rows (a view of leading rows of a larger weight is fine) and K a multiple of 32
// for the block formats. `what` names the argument in messages.
inline void check_weight(const char* op, const char* what, const at::Tensor& weight,
                         WeightFormat f, int64_t rows, int64_t K) {
  if (f == WeightFormat::kDense) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) == rows && weight.size(1) == K,
                op, ": ", what, " must be [", rows, ", ", K, "], got ", weight.sizes());
    TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, ": ", what,
                " (dense) must be floating, got ", weight.scalar_type());
    return;
  }
  TORCH_CHECK(f == WeightFormat::kInt8 || K % kQuantBlock == 0, op, ": ", what,
              " in a block format needs in_features divisible by ", kQuantBlock, ", got ", K);
  const int64_t bytes = weight_row_bytes(f, K);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.size(0) == rows &&
              weight.size(1) == bytes && weight.stride(1) == 1,
              op, ": ", what, " (quantized) must be uint8 [", rows, ", ", bytes,
              "] with contiguous rows, got ", weight.scalar_type(), " ", weight.sizes());
}

struct LinearSizes {
  int64_t M, K, N;  // rows of x (all leading dims), in features, out features (of the product)
  int64_t N_out;    // out features after the activation (N / 2 when gated)
  Activation act;
  WeightFormat format;
};

// linear: x [..., K] @ weight [N, K]^T + bias [N], activation, + residual [..., N_out]; x, bias
// and residual of one dtype, the weight in `weight_format` (check_weight); row_mask bool [...],
// x's leading shape.
inline LinearSizes check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     c10::string_view activation,
                                     const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& row_mask,
                                     c10::string_view weight_format) {
  TORCH_CHECK(x.dim() >= 1, "linear: x must have at least one dimension");
  TORCH_CHECK(weight.dim() == 2, "linear: weight must be [out_features, in_features] (dense) or "
              "[out_features, row_bytes] (quantized)");
  const WeightFormat format = parse_weight_format(weight_format, "linear");
  const int64_t K = x.size(-1), N = weight.size(0);
  check_weight("linear", "weight", weight, format, N, K);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N),
              "linear: bias must be [", N, "]");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) &&
              (!bias.has_value() || bias->scalar_type() == x.scalar_type()),
              "linear: x must be floating and bias must have its dtype");
  const Activation act = parse_activation(activation);
  TORCH_CHECK(act != Activation::kSiluGated || N % 2 == 0,
              "linear: silu_gated needs an even number of weight rows (gate | up), got ", N);
  const int64_t N_out = act == Activation::kSiluGated ? N / 2 : N;
  if (residual.has_value()) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N_out;
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape) && residual->scalar_type() == x.scalar_type(),
                "linear: residual must be ", at::IntArrayRef(shape), " in x's dtype, got ",
                residual->sizes(), " ", residual->scalar_type());
  }
  if (row_mask.has_value()) {
    const at::IntArrayRef rows = x.sizes().slice(0, x.dim() - 1);
    TORCH_CHECK(row_mask->scalar_type() == at::kBool && row_mask->sizes() == rows,
                "linear: row_mask must be bool ", rows, ", got ", row_mask->scalar_type(), " ",
                row_mask->sizes());
  }
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) M *= x.size(i);
  return {M, K, N, N_out, act, format};
}

struct SkipKvSizes {
  int64_t N, hidden, num_slots, kv_heads, d, q_heads;   // q_heads: 0 without q_out
  WeightFormat format;                                  // kv_weight's
};

// skip_kv: h [N, hidden]; the layer's caches [num_slots, kv_heads, d]; norm_weight and
// norm_bias [hidden]; kv_weight [2*kv_size, hidden] in weight_format (check_weight) and kv_bias
// [2*kv_size], rows K | V; the caches and kv_bias in h's dtype. With q_out [N, q_heads, d]
// kv_weight and kv_bias also hold the Q rows (K | V | Q). Same checks as
// ops/reference.py:check_skip_kv_args.
inline SkipKvSizes check_skip_kv_args(
    const at::Tensor& h, const at::Tensor& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const at::Tensor& kv_weight, const std::optional<at::Tensor>& kv_bias,
    const at::Tensor& positions, const std::optional<at::Tensor>& inv_freq,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
    const std::optional<at::Tensor>& q_out, c10::string_view weight_format) {
  TORCH_CHECK(h.dim() == 2 && k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(),
              "skip_kv: h must be [N, hidden] and k_cache, v_cache both [slots, kv_heads, "
              "head_dim], got h ", h.sizes(), ", k_cache ", k_cache.sizes(), ", v_cache ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == h.scalar_type() && v_cache.scalar_type() == h.scalar_type(),
              "skip_kv: the caches must have h's dtype ", h.scalar_type());
  const WeightFormat format = parse_weight_format(weight_format, "skip_kv");
  const int64_t N = h.size(0), hidden = h.size(1);
  const int64_t num_slots = k_cache.size(0);
  const int64_t kv_heads = k_cache.size(1), d = k_cache.size(2), kv_size = kv_heads * d;
  int64_t q_heads = 0;
  if (q_out.has_value()) {
    TORCH_CHECK(q_out->dim() == 3 && q_out->size(0) == N && q_out->size(2) == d &&
                q_out->scalar_type() == h.scalar_type(),
                "skip_kv: q_out must be [N, heads, head_dim] in h's dtype, got ", q_out->sizes(),
                " ", q_out->scalar_type());
    q_heads = q_out->size(1);
  }
  const int64_t rows = 2 * kv_size + q_heads * d;   // K | V (| Q) rows of kv_weight
  const char* layout = q_out.has_value() ? "K|V|Q" : "K|V";
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == hidden,
              "skip_kv: norm_weight must be [", hidden, "], got ", norm_weight.sizes());
  TORCH_CHECK(!norm_bias.has_value() || (norm_bias->dim() == 1 && norm_bias->size(0) == hidden),
              "skip_kv: norm_bias must be [", hidden, "], got ", norm_bias->sizes());
  const std::string what = std::string("kv_weight (") + layout + " rows)";
  check_weight("skip_kv", what.c_str(), kv_weight, format, rows, hidden);
  TORCH_CHECK(!kv_bias.has_value() || (kv_bias->dim() == 1 && kv_bias->size(0) == rows),
              "skip_kv: kv_bias (", layout, ") must be [", rows, "], got ", kv_bias->sizes());
  TORCH_CHECK(!kv_bias.has_value() || kv_bias->scalar_type() == h.scalar_type(),
              "skip_kv: kv_bias must have h's dtype ", h.scalar_type());
  TORCH_CHECK(slot_mapping.numel() == N && positions.numel() == N,
              "skip_kv: slot_mapping and positions must have one entry per row of h");
  TORCH_CHECK(!inv_freq.has_value() || (d % 2 == 0 && inv_freq->numel() == d / 2),
              "skip_kv: inv_freq must have head_dim / 2 entries");
  return {N, hidden, num_slots, kv_heads, d, q_heads, format};
}

struct SkipAdapterSizes {
  int64_t N, hidden, rank;
  WeightFormat format;                  // down_weight's and up_weight's
};

// skip_adapter: h [N, hidden]; norm_weight and norm_bias [hidden]; down_weight [rank, hidden] and
// up_weight [hidden, rank], both in weight_format (check_weight; dense ones in h's dtype); up_bias
// [hidden] in h's dtype;
// row_mask bool [N] on h's device. Same checks and messages as
// ops/reference.py:check_skip_adapter_args.
inline SkipAdapterSizes check_skip_adapter_args(
    const at::Tensor& h, const at::Tensor& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const at::Tensor& down_weight, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& up_bias, const at::Tensor& row_mask,
    c10::string_view weight_format) {
  TORCH_CHECK(h.dim() == 2 && down_weight.dim() == 2,
              "skip_adapter: h must be [N, hidden] and down_weight [rank, hidden], got h ",
              h.sizes(), ", down_weight ", down_weight.sizes());
  const WeightFormat format = parse_weight_format(weight_format, "skip_adapter");
  const int64_t N = h.size(0), hidden = h.size(1), rank = down_weight.size(0);
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == hidden,
              "skip_adapter: norm_weight must be [", hidden, "], got ", norm_weight.sizes());
  TORCH_CHECK(!norm_bias.has_value() || (norm_bias->dim() == 1 && norm_bias->size(0) == hidden),
              "skip_adapter: norm_bias must be [", hidden, "], got ", norm_bias->sizes());
  check_weight("skip_adapter", "down_weight", down_weight, format, rank, hidden);
  check_weight("skip_adapter", "up_weight", up_weight, format, hidden, rank);
  TORCH_CHECK(!up_bias.has_value() || (up_bias->dim() == 1 && up_bias->size(0) == hidden),
              "skip_adapter: up_bias must be [", hidden, "], got ", up_bias->sizes());
  TORCH_CHECK(row_mask.scalar_type() == at::kBool && row_mask.dim() == 1 && row_mask.size(0) == N &&
              row_mask.device() == h.device(),
              "skip_adapter: row_mask must be bool [", N, "] on ", h.device(), ", got ",
              row_mask.scalar_type(), " ", row_mask.sizes(), " on ", row_mask.device());
  TORCH_CHECK(!up_bias.has_value() || up_bias->scalar_type() == h.scalar_type(),
              "skip_adapter: up_bias must have h's dtype ", h.scalar_type());
  TORCH_CHECK(format != WeightFormat::kDense || (down_weight.scalar_type() == h.scalar_type() &&
                                                 up_weight.scalar_type() == h.scalar_type()),
              "skip_adapter: dense down_weight and up_weight must have h's dtype ", h.scalar_type());
  return {N, hidden, rank, format};
}

struct PagedAttentionSizes {
  int64_t N, heads, d, num_slots, kv_heads;
};

// paged_attention: q [N, heads, d] over caches [num_slots, kv_heads, d] of q's dtype, with
// heads a multiple of kv_heads (GQA) and one seq_idx / position per row of q.
inline PagedAttentionSizes check_paged_attention_args(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_idx, const at::Tensor& positions,
    int64_t block_size) {
  TORCH_CHECK(q.dim() == 3, "paged_attention: q must be [N, heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(),
              "paged_attention: k_cache and v_cache must both be [slots, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_attention: q and the caches must have the same dtype");
  TORCH_CHECK(block_tables.dim() == 2, "paged_attention: block_tables must be [seqs, max_blocks]");
  TORCH_CHECK(block_size > 0, "paged_attention: block_size must be positive, got ", block_size);
  const int64_t N = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t num_slots = k_cache.size(0), kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == d, "paged_attention: q and cache head_dim differ");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0,
              "paged_attention: heads must be a multiple of kv_heads");
  TORCH_CHECK(seq_idx.numel() == N && positions.numel() == N,
              "paged_attention: seq_idx and positions must have one entry per row of q");
  return {N, heads, d, num_slots, kv_heads};
}

// policy_step: proposed int8 [N]; spent float32, stopped bool and budget_left float32 (written
// in place), all [N] and contiguous; allowed and limit float32 [N]; actions int8 [N, L] with
// 0 <= layer < L; stop_code SKIP (1) or EXIT (2). Returns N.
inline int64_t check_policy_step_args(const at::Tensor& proposed, const at::Tensor& spent,
                                      const at::Tensor& stopped, const at::Tensor& allowed,
                                      const at::Tensor& limit, const at::Tensor& budget_left,
                                      const at::Tensor& actions, int64_t layer, int64_t stop_code) {
  const int64_t N = proposed.numel();
  TORCH_CHECK(proposed.dim() == 1 && proposed.scalar_type() == at::kChar,
              "policy_step: proposed must be int8 [N]");
  TORCH_CHECK(spent.dim() == 1 && spent.numel() == N && spent.scalar_type() == at::kFloat &&
              spent.is_contiguous(), "policy_step: spent must be a contiguous float32 [", N, "]");
  TORCH_CHECK(stopped.dim() == 1 && stopped.numel() == N && stopped.scalar_type() == at::kBool &&
              stopped.is_contiguous(), "policy_step: stopped must be a contiguous bool [", N, "]");
  TORCH_CHECK(allowed.dim() == 1 && allowed.numel() == N && allowed.scalar_type() == at::kFloat,
              "policy_step: allowed must be float32 [", N, "]");
  TORCH_CHECK(limit.dim() == 1 && limit.numel() == N && limit.scalar_type() == at::kFloat,
              "policy_step: limit must be float32 [", N, "]");
  TORCH_CHECK(budget_left.dim() == 1 && budget_left.numel() == N &&
              budget_left.scalar_type() == at::kFloat && budget_left.is_contiguous(),
              "policy_step: budget_left must be a contiguous float32 [", N, "]");
  TORCH_CHECK(actions.dim() == 2 && actions.size(0) == N && actions.scalar_type() == at::kChar,
              "policy_step: actions must be int8 [", N, ", layers]");
  TORCH_CHECK(layer >= 0 && layer < actions.size(1), "policy_step: layer ", layer,
              " is out of range for ", actions.size(1), " layers");
  TORCH_CHECK(stop_code == 1 || stop_code == 2, "policy_step: stop_code must be SKIP (1) or EXIT (2), got ",
              stop_code);
  return N;
}

// saturation_codes: h and h_prev [N, hidden] of one dtype, budget_left float32 [N]. Returns N.
inline int64_t check_saturation_codes_args(const at::Tensor& h, const at::Tensor& h_prev,
                                           const at::Tensor& budget_left) {
  TORCH_CHECK(h.dim() == 2 && h.sizes() == h_prev.sizes() && h.scalar_type() == h_prev.scalar_type(),
              "saturation_codes: h and h_prev must be [N, hidden] of one shape and dtype, got ",
              h.sizes(), " ", h.scalar_type(), " and ", h_prev.sizes(), " ", h_prev.scalar_type());
  TORCH_CHECK(budget_left.dim() == 1 && budget_left.size(0) == h.size(0) &&
              budget_left.scalar_type() == at::kFloat,
              "saturation_codes: budget_left must be float32 [N]");
  return h.size(0);
}

struct BudgetControllerSizes {
  int64_t N, hidden, proj_dim, width;
};

// budget_controller: h and h_prev floating [N, hidden] of one shape and dtype; budget and
// budget_left float32 [N]; the net float32: scalar_mean, scalar_std [8], proj_weight [proj_dim,
// hidden], inp_weight [width, 8 + proj_dim], inp_bias [width], layer_weight [num_layers, width],
// hidden_weight [width, width], hidden_bias [width], out_weight [1, width], out_bias [1]; 0 <=
// layer < num_layers, 0 <= skip_cost < 1, -1 <= order_position < order_length <= num_layers. Same
// checks as ops/reference.py:check_budget_controller_args.
inline BudgetControllerSizes check_budget_controller_args(
    const at::Tensor& h, const at::Tensor& h_prev, const at::Tensor& budget,
    const at::Tensor& budget_left, const at::Tensor& scalar_mean, const at::Tensor& scalar_std,
    const at::Tensor& proj_weight, const at::Tensor& inp_weight, const at::Tensor& inp_bias,
    const at::Tensor& layer_weight, const at::Tensor& hidden_weight, const at::Tensor& hidden_bias,
    const at::Tensor& out_weight, const at::Tensor& out_bias, int64_t layer, int64_t num_layers,
    double skip_cost, int64_t order_position, int64_t order_length) {
  TORCH_CHECK(h.dim() == 2 && h.sizes() == h_prev.sizes() && h.scalar_type() == h_prev.scalar_type() &&
              at::isFloatingType(h.scalar_type()),
              "budget_controller: h and h_prev must be floating [N, hidden] of one shape and dtype, "
              "got ", h.scalar_type(), " ", h.sizes(), " and ", h_prev.scalar_type(), " ", h_prev.sizes());
  TORCH_CHECK(proj_weight.dim() == 2 && inp_weight.dim() == 2,
              "budget_controller: proj_weight must be [proj_dim, hidden] and inp_weight [width, 8 + "
              "proj_dim], got ", proj_weight.sizes(), " and ", inp_weight.sizes());
  const int64_t N = h.size(0), hidden = h.size(1);
  const int64_t proj_dim = proj_weight.size(0), width = inp_weight.size(0);
  constexpr int64_t F = 8;   // ops/reference.py:CONTROLLER_FEATURES
  const struct {
    const char* name;
    const at::Tensor& t;
    std::vector<int64_t> shape;
  } args[] = {{"budget", budget, {N}}, {"budget_left", budget_left, {N}},
              {"scalar_mean", scalar_mean, {F}}, {"scalar_std", scalar_std, {F}},
              {"proj_weight", proj_weight, {proj_dim, hidden}},
              {"inp_weight", inp_weight, {width, F + proj_dim}}, {"inp_bias", inp_bias, {width}},
              {"layer_weight", layer_weight, {num_layers, width}},
              {"hidden_weight", hidden_weight, {width, width}}, {"hidden_bias", hidden_bias, {width}},
              {"out_weight", out_weight, {1, width}}, {"out_bias", out_bias, {1}}};
  for (const auto& a : args) {
    TORCH_CHECK(a.t.scalar_type() == at::kFloat && a.t.sizes() == at::IntArrayRef(a.shape),
                "budget_controller: ", a.name, " must be float32 ", at::IntArrayRef(a.shape),
                ", got ", a.t.scalar_type(), " ", a.t.sizes());
  }
  TORCH_CHECK(layer >= 0 && layer < num_layers, "budget_controller: layer ", layer,
              " is out of range for ", num_layers, " layers");
  TORCH_CHECK(skip_cost >= 0 && skip_cost < 1, "budget_controller: skip_cost must be in [0, 1), got ",
              skip_cost);
  TORCH_CHECK(order_length >= 0 && order_length <= num_layers && order_position >= -1 &&
              order_position < order_length,
              "budget_controller: order_position must be -1 or in [0, order_length) and order_length "
              "in [0, num_layers], got ", order_position, " and ", order_length, " for ", num_layers,
              " layers");
  return {N, hidden, proj_dim, width};
}

}  // namespace anee_fast
