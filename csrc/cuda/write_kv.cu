// CUDA implementation of anee_fast::write_kv: copies K/V rows [N, kv_heads, d] into one layer's
// cache slots (see ops/reference.py:write_kv). One thread per (row, head, element); rows with slot
// -1 write nothing. The slot mapping is read on the device: an out-of-range slot trips a
// device-side assert (and is never written).

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_common.cuh"

namespace anee_fast::cuda {
namespace {

constexpr int kThreads = 256;

// A cache [slots, heads, d] addressed through its strides (a layer slice of a bigger cache).
struct CacheStrides {
  int64_t slot, head, dim;
};

template <typename scalar_t>
__global__ void write_kv_kernel(const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache,
                                CacheStrides ks, CacheStrides vs, const int64_t* __restrict__ slots,
                                int64_t N, int64_t H, int64_t D, int64_t num_slots) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * H * D) return;
  const int64_t n = idx / (H * D), h = (idx / D) % H, i = idx % D;
  const int64_t slot = slots[n];
  CUDA_KERNEL_ASSERT(slot >= -1 && slot < num_slots);
  if (slot < 0 || slot >= num_slots) return;
  k_cache[slot * ks.slot + h * ks.head + i * ks.dim] = k[idx];
  v_cache[slot * vs.slot + h * vs.head + i * vs.dim] = v[idx];
}

}  // namespace

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.is_cuda(), "write_kv: CUDA implementation called with a ", k_cache.device(),
              " k_cache");
  check_cuda(v_cache, k_cache, "write_kv", "v_cache");
  check_cuda(k, k_cache, "write_kv", "k");
  check_cuda(v, k_cache, "write_kv", "v");
  const WriteKvSizes sizes = check_write_kv_args(k, v, k_cache, v_cache, slot_mapping);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor slots = index_tensor(slot_mapping, k_cache, "write_kv", "slot_mapping");
  const int64_t N = sizes.N, H = sizes.kv_heads, D = sizes.d;
  const int64_t total = N * H * D;
  if (total == 0) return;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "write_kv: ", total, " elements is more than one launch handles");
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  const CacheStrides ks{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const CacheStrides vs{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ANEE_FAST_DISPATCH_FLOATS(k_cache.scalar_type(), "anee_fast_write_kv_cuda", [&] {
    write_kv_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
        v_cache.data_ptr<scalar_t>(), ks, vs, slots.data_ptr<int64_t>(), N, H, D, sizes.num_slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace anee_fast::cuda
