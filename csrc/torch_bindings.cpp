// Schemas of the anee_fast ops (one name and one signature everywhere: see
// anee_fast/ops/reference.py) and their registration per device: CPU kernels in csrc/cpu/, CUDA
// kernels in csrc/cuda/ (one file per op, declared in ops.h). Fake (meta) implementations for
// torch.compile live in anee_fast/ops/native.py. This is the only file that includes <torch/library.h>.
//
// Only <torch/library.h> and ATen headers: no pybind11 (torch/extension.h), which keeps the
// build fast. Importing the Python module `anee_fast._C` just loads this library so that the
// static TORCH_LIBRARY initialisers run; the ops are then reached as torch.ops.anee_fast.*.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(anee_fast, m) {
  m.set_python_module("anee_fast.ops.native");
  m.def("norm(Tensor x, Tensor weight, Tensor? bias, float eps, bool rms) -> Tensor");
  m.def("add_norm(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps, bool rms) "
        "-> (Tensor, Tensor)");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, str activation=\"none\", "
        "Tensor? residual=None, Tensor? row_mask=None, str weight_format=\"dense\") -> Tensor");
  m.def("skip_kv(Tensor h, Tensor norm_weight, Tensor? norm_bias, Tensor kv_weight, "
        "Tensor? kv_bias, Tensor positions, Tensor? inv_freq, float rope_scale, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, float eps, bool rms, "
        "Tensor(c!)? q_out=None, str weight_format=\"dense\") -> ()");
  m.def("skip_adapter(Tensor h, Tensor norm_weight, Tensor? norm_bias, Tensor down_weight, "
        "Tensor up_weight, Tensor? up_bias, Tensor row_mask, float eps, bool rms, "
        "str weight_format=\"dense\") -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_idx, Tensor positions, int block_size, float scale, int sliding_window) "
        "-> Tensor");
  m.def("policy_step(Tensor proposed, Tensor(a!) spent, Tensor(b!) stopped, Tensor allowed, "
        "Tensor limit, Tensor(c!) budget_left, Tensor(d!) actions, int layer, float commitment, "
        "float skip_cost, int stop_code, bool forced) -> Tensor");
  m.def("saturation_codes(Tensor h, Tensor h_prev, Tensor budget_left, float skip_saturation, "
        "float exit_saturation, float exit_threshold) -> Tensor");
  m.def("budget_controller(Tensor h, Tensor h_prev, Tensor budget, Tensor budget_left, "
        "Tensor scalar_mean, Tensor scalar_std, Tensor proj_weight, Tensor inp_weight, "
        "Tensor inp_bias, Tensor layer_weight, Tensor hidden_weight, Tensor hidden_bias, "
        "Tensor out_weight, Tensor out_bias, int layer, int num_layers, float skip_cost, "
        "int order_position, int order_length, float margin, float net_min_budget, "
        "float net_max_budget, float exit_threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(anee_fast, CPU, m) {
  m.impl("norm", &anee_fast::cpu::norm);
  m.impl("add_norm", &anee_fast::cpu::add_norm);
  m.impl("linear", &anee_fast::cpu::linear);
  m.impl("skip_kv", &anee_fast::cpu::skip_kv);
  m.impl("skip_adapter", &anee_fast::cpu::skip_adapter);
  m.impl("paged_attention", &anee_fast::cpu::paged_attention);
  m.impl("policy_step", &anee_fast::cpu::policy_step);
  m.impl("saturation_codes", &anee_fast::cpu::saturation_codes);
  m.impl("budget_controller", &anee_fast::cpu::budget_controller);
}

// CUDA kernels (csrc/cuda/*.cu), compiled in when setup.py finds a CUDA torch and nvcc (it then
// defines ANEE_FAST_WITH_CUDA). ops/native.py supports("cuda") asks the dispatcher for these.
#ifdef ANEE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(anee_fast, CUDA, m) {
  m.impl("norm", &anee_fast::cuda::norm);
  m.impl("add_norm", &anee_fast::cuda::add_norm);
  m.impl("linear", &anee_fast::cuda::linear);
  m.impl("skip_kv", &anee_fast::cuda::skip_kv);
  m.impl("skip_adapter", &anee_fast::cuda::skip_adapter);
  m.impl("paged_attention", &anee_fast::cuda::paged_attention);
  m.impl("policy_step", &anee_fast::cuda::policy_step);
  m.impl("saturation_codes", &anee_fast::cuda::saturation_codes);
  m.impl("budget_controller", &anee_fast::cuda::budget_controller);
}
#endif

extern "C" {
// An empty Python module: `import anee_fast._C` loads this shared library (running the
// registrations above) and needs nothing else from it.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // doc
      -1,       // per-interpreter state size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
