// CUDA implementation of anee_fast::budget_controller: the trained controller's proposal for every
// token (see ops/reference.py:budget_controller; features and rule in csrc/policy_rule.h), one
// launch where PyTorch takes about 110. One block per row, in float32: the block sums the scalar
// features' terms, then the centred variance; a warp per output of the projection of the
// RMS-normalised row; a thread per unit of each MLP layer (through shared memory); thread 0
// applies the rule. No host synchronisation: capturable in a CUDA graph.

#include <ATen/ops/empty.h>

#include <utility>

#include "../op_checks.h"
#include "../ops.h"
#include "../policy_rule.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedFloats = 12 * 1024;   // 48 KB of dynamic shared memory

// The controller net's float32 tensors (contiguous); layer_bias: row `layer` of the embedding.
struct NetPointers {
  const float *mean, *std, *proj, *inp_w, *inp_b, *layer_bias, *hid_w, *hid_b, *out_w, *out_b;
};

template <typename scalar_t>
__global__ void budget_controller_kernel(const scalar_t* __restrict__ h,
                                        const scalar_t* __restrict__ h_prev,
                                        const float* __restrict__ budget,
                                        const float* __restrict__ budget_left, NetPointers net,
                                        int64_t H, int P, int W, BudgetRule rule,
                                        int8_t* __restrict__ codes) {
  extern __shared__ float shared[];       // the net's input [8 + P], its layers' outputs [W], [W]
  __shared__ float scratch[kWarp];
  const int I = kControllerFeatures + P;
  float* x = shared;
  float* z = x + I;
  float* hid = z + W;
  const int64_t n = blockIdx.x;
  const scalar_t* u = h + n * H;
  const scalar_t* v = h_prev + n * H;

  float sum = 0.f, hh = 0.f, pp = 0.f, hp = 0.f, dd = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float p = static_cast<float>(u[i]), q = static_cast<float>(v[i]), d = p - q;
    sum += p;
    hh += p * p;
    pp += q * q;
    hp += p * q;
    dd += d * d;
  }
  sum = block_sum(sum, scratch);
  hh = block_sum(hh, scratch);
  pp = block_sum(pp, scratch);
  hp = block_sum(hp, scratch);
  dd = block_sum(dd, scratch);
  const float mean = sum / static_cast<float>(H);
  float centred = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float c = static_cast<float>(u[i]) - mean;
    centred += c * c;
  }
  centred = block_sum(centred, scratch);

  float f[kControllerFeatures];         // the same in every thread
  controller_scalars(hh, dd, centred / static_cast<float>(H - 1), pp, hp, budget[n],
                     budget_left[n], rule, f);
  if (threadIdx.x < kControllerFeatures)
    x[threadIdx.x] = (f[threadIdx.x] - net.mean[threadIdx.x]) / net.std[threadIdx.x];
  const float rstd = 1.f / sqrtf(hh / static_cast<float>(H) + 1e-6f);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int p = warp; p < P; p += warps) {
    const float* w = net.proj + static_cast<int64_t>(p) * H;
    float acc = 0.f;
    for (int64_t i = lane; i < H; i += kWarp) acc += w[i] * (static_cast<float>(u[i]) * rstd);
    acc = warp_sum(acc);
    if (lane == 0) x[kControllerFeatures + p] = acc;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < W; j += blockDim.x) {
    const float* w = net.inp_w + static_cast<int64_t>(j) * I;
    float acc = 0.f;
    for (int k = 0; k < I; ++k) acc += w[k] * x[k];
    z[j] = fmaxf(acc + net.inp_b[j] + net.layer_bias[j], 0.f);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < W; j += blockDim.x) {
    const float* w = net.hid_w + static_cast<int64_t>(j) * W;
    float acc = 0.f;
    for (int k = 0; k < W; ++k) acc += w[k] * z[k];
    hid[j] = fmaxf(acc + net.hid_b[j], 0.f);
  }
  __syncthreads();
  float part = 0.f;
  for (int j = threadIdx.x; j < W; j += blockDim.x) part += net.out_w[j] * hid[j];
  const float logit = block_sum(part, scratch) + net.out_b[0];
  if (threadIdx.x == 0)
    codes[n] = budget_controller_rule(logit, f[kAffordable], budget[n], budget_left[n], rule);
}

}  // namespace

at::Tensor budget_controller(const at::Tensor& h, const at::Tensor& h_prev, const at::Tensor& budget,
                             const at::Tensor& budget_left, const at::Tensor& scalar_mean,
                             const at::Tensor& scalar_std, const at::Tensor& proj_weight,
                             const at::Tensor& inp_weight, const at::Tensor& inp_bias,
                             const at::Tensor& layer_weight, const at::Tensor& hidden_weight,
                             const at::Tensor& hidden_bias, const at::Tensor& out_weight,
                             const at::Tensor& out_bias, int64_t layer, int64_t num_layers,
                             double skip_cost, int64_t order_position, int64_t order_length,
                             double margin, double net_min_budget, double net_max_budget,
                             double exit_threshold) {
  TORCH_CHECK(h.is_cuda(), "budget_controller: CUDA implementation called with a ", h.device(),
              " tensor h");
  const std::pair<const at::Tensor*, const char*> inputs[] = {
      {&h_prev, "h_prev"}, {&budget, "budget"}, {&budget_left, "budget_left"},
      {&scalar_mean, "scalar_mean"}, {&scalar_std, "scalar_std"}, {&proj_weight, "proj_weight"},
      {&inp_weight, "inp_weight"}, {&inp_bias, "inp_bias"}, {&layer_weight, "layer_weight"},
      {&hidden_weight, "hidden_weight"}, {&hidden_bias, "hidden_bias"},
      {&out_weight, "out_weight"}, {&out_bias, "out_bias"}};
  for (const auto& [t, name] : inputs) check_cuda(*t, h, "budget_controller", name);
  const BudgetControllerSizes s = check_budget_controller_args(
      h, h_prev, budget, budget_left, scalar_mean, scalar_std, proj_weight, inp_weight, inp_bias,
      layer_weight, hidden_weight, hidden_bias, out_weight, out_bias, layer, num_layers, skip_cost,
      order_position, order_length);
  TORCH_CHECK(s.N <= INT32_MAX, "budget_controller: too many rows for one launch");
  const int64_t shared_floats = kControllerFeatures + s.proj_dim + 2 * s.width;
  TORCH_CHECK(shared_floats <= kMaxSharedFloats, "budget_controller: proj_dim + 2 * width must be "
              "at most ", kMaxSharedFloats - kControllerFeatures, " on CUDA, got ", s.proj_dim,
              " + 2 * ", s.width);
  at::Tensor codes = at::empty({s.N}, h.options().dtype(at::kChar));
  if (s.N == 0) return codes;
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hc = h.contiguous(), pc = h_prev.contiguous();
  const at::Tensor bud = budget.contiguous(), left = budget_left.contiguous();
  const at::Tensor mean_t = scalar_mean.contiguous(), std_t = scalar_std.contiguous();
  const at::Tensor proj_t = proj_weight.contiguous(), inp_w_t = inp_weight.contiguous();
  const at::Tensor inp_b_t = inp_bias.contiguous(), layer_t = layer_weight.contiguous();
  const at::Tensor hid_w_t = hidden_weight.contiguous(), hid_b_t = hidden_bias.contiguous();
  const at::Tensor out_w_t = out_weight.contiguous(), out_b_t = out_bias.contiguous();
  const NetPointers net{mean_t.data_ptr<float>(), std_t.data_ptr<float>(), proj_t.data_ptr<float>(),
                        inp_w_t.data_ptr<float>(), inp_b_t.data_ptr<float>(),
                        layer_t.data_ptr<float>() + layer * s.width, hid_w_t.data_ptr<float>(),
                        hid_b_t.data_ptr<float>(), out_w_t.data_ptr<float>(),
                        out_b_t.data_ptr<float>()};
  const BudgetRule rule = budget_rule(layer, num_layers, skip_cost, order_position, order_length,
                                      margin, net_min_budget, net_max_budget, exit_threshold);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(h.scalar_type(), "anee_fast_budget_controller_cuda", [&] {
    budget_controller_kernel<scalar_t>
        <<<static_cast<unsigned>(s.N), kThreads, shared_floats * sizeof(float), stream>>>(
            hc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), bud.data_ptr<float>(),
            left.data_ptr<float>(), net, s.hidden, static_cast<int>(s.proj_dim),
            static_cast<int>(s.width), rule, codes.data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return codes;
}

}  // namespace anee_fast::cuda
