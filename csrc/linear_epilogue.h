// linear's epilogue (activation, row mask, residual add) as ATen ops, after a product computed by
// at::linear: the CPU op always, the CUDA op past its fused decode kernel's rows. Same steps and
// roundings as ops/reference.py:linear.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/where.h>

#include <optional>

#include "op_checks.h"

namespace anee_fast {

inline at::Tensor linear_epilogue(at::Tensor y, Activation act,
                                  const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& row_mask) {
  if (act == Activation::kGeluTanh) {
    y = at::gelu(y, "tanh");
  } else if (act == Activation::kSiluGated) {
    const std::vector<at::Tensor> gate_up = y.chunk(2, -1);
    y = at::silu(gate_up[0]).mul_(gate_up[1]);
  }
  if (row_mask.has_value()) y = at::where(row_mask->unsqueeze(-1), y, c10::Scalar(0));
  return residual.has_value() ? residual->add(y) : y;
}

}  // namespace anee_fast
