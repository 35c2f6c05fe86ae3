// CUDA implementation of anee_fast::linear: y = x @ weight^T + bias (see reference_ops.linear).
// cuBLAS (through at::linear) is the GEMV/GEMM here: on the GPU an own kernel would have to beat
// it on every shape, and the decode step's launches are captured in CUDA graphs anyway.
#include <c10/core/DispatchKeySet.h>  // needed by linear_ops.h
#include <ATen/ops/linear_ops.h>

#include "../op_checks.h"
#include "../ops.h"

namespace anee_fast::cuda {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device() &&
              (!bias.has_value() || bias->device() == x.device()),
              "linear: CUDA implementation called with tensors on other devices");
  check_linear_args(x, weight, bias);
  return at::_ops::linear::call(x, weight, bias);
}

}  // namespace anee_fast::cuda
