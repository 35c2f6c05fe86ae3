// CPU implementation of anee_fast::write_kv: copies K/V rows [N, kv_heads, d] into one layer's
// cache slots (see ops/reference.py:write_kv). Rows with slot -1 write nothing at all (the reference
// sends them to the spare last slot; this op leaves every slot they do not own untouched).

#include <cstring>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu() && k.device().is_cpu() &&
              v.device().is_cpu(), "write_kv: CPU implementation called with non-CPU tensors");
  const WriteKvSizes sizes = check_write_kv_args(k, v, k_cache, v_cache, slot_mapping);
  const at::Tensor slots_t = index_tensor(slot_mapping, "slot_mapping");
  const int64_t* slots = slots_t.data_ptr<int64_t>();
  const int64_t N = sizes.N, H = sizes.kv_heads, D = sizes.d;
  check_slots(slots, N, sizes.num_slots);
  if (N == 0) return;

  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(),
                                  "anee_fast_write_kv", [&] {
    const CacheView<scalar_t> kv_views[2] = {CacheView<scalar_t>(k_cache),
                                             CacheView<scalar_t>(v_cache)};
    const scalar_t* srcs[2] = {kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>()};
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t slot = slots[n];
        if (slot < 0) continue;
        for (int which = 0; which < 2; ++which) {
          const CacheView<scalar_t>& c = kv_views[which];
          const scalar_t* src = srcs[which] + n * H * D;
          if (c.s_dim == 1 && c.s_head == D) {
            std::memcpy(c.row(slot, 0), src, sizeof(scalar_t) * H * D);
          } else {
            for (int64_t hh = 0; hh < H; ++hh) {
              scalar_t* dst = c.row(slot, hh);
              for (int64_t i = 0; i < D; ++i) dst[i * c.s_dim] = src[hh * D + i];
            }
          }
        }
      }
    });
  });
}

}  // namespace anee_fast::cpu
