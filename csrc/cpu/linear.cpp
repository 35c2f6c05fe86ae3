// CPU implementation of anee_fast::linear: activation(x @ weight^T + bias), rows masked by
// row_mask, (+ residual), see ops/reference.py:linear. The epilogue runs as ATen ops (linear_epilogue.h): on the CPU a launch
// costs little, the product is what counts.
//
// Why an own kernel: a decode step multiplies a few rows by every weight matrix, so it is a
// GEMV that streams the weights once from DRAM. torch's CPU GEMM reached 9-16 GB/s on such
// calls on the 2-core development machine, where a plain read streams at about 25 GB/s; the
// kernel below reads each weight row once for up to kMaxRows rows of x, with four rows of the
// weight in flight per thread (AVX2 + FMA). Larger row counts (prefill, big batches) are GEMMs
// and go to at::linear, as do other dtypes and CPUs without AVX2.
#include <c10/core/DispatchKeySet.h>  // needed by linear_ops.h
#include <ATen/ops/linear_ops.h>
#include <immintrin.h>

#include "../linear_epilogue.h"
#include "../op_checks.h"
#include "../ops.h"
#include "cpu_common.h"

namespace anee_fast::cpu {
namespace {

// Rows of x up to which the kernel beats at::linear (python/bench_kernels.py --ops linear).
constexpr int64_t kMaxRows = 16;

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// y[m, n + i] = x[m] . w[n + i] for i < NR weight rows and m < MB rows of x.
template <int NR, int MB>
__attribute__((target("avx2,fma"))) void dot_tile(const float* x, int64_t ldx, const float* w,
                                                  int64_t ldw, int64_t K, float* y, int64_t ldy) {
  __m256 acc[NR][MB];
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
    for (int i = 0; i < NR; ++i) {
      const __m256 wv = _mm256_loadu_ps(w + i * ldw + k);
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_fmadd_ps(wv, xv[m], acc[i][m]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MB; ++m) {
      float s = horizontal_sum(acc[i][m]);
      for (int64_t kk = k; kk < K; ++kk) s += w[i * ldw + kk] * x[m * ldx + kk];
      y[m * ldy + i] = s;
    }
}

// NR weight rows from row n against every row of x, two rows of x at a time.
template <int NR>
void dot_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t ldw, int64_t n,
              float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) dot_tile<NR, 2>(x + m * K, K, w + n * ldw, ldw, K, y + m * N + n, N);
  if (m < M) dot_tile<NR, 1>(x + m * K, K, w + n * ldw, ldw, K, y + m * N + n, N);
}

bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

}  // namespace

namespace {

// x @ weight^T + bias.
at::Tensor product(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const LinearSizes& sizes) {
  const int64_t M = sizes.M, K = sizes.K, N = sizes.N;
  if (M > kMaxRows || x.scalar_type() != at::kFloat || !has_avx2_fma() || K == 0)
    return at::_ops::linear::call(x, weight, bias);

  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const int64_t ldw = w.stride(0);
  at::Tensor out = x.new_empty({M, N});
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  // Groups of four weight rows; each thread takes a run of groups of at least ~32 KB.
  const int64_t groups = N / 4;
  at::parallel_for(0, groups, std::max<int64_t>(1, 8192 / K), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) dot_rows<4>(xp, M, K, wp, ldw, g * 4, yp, N);
  });
  for (int64_t n = groups * 4; n < N; ++n) dot_rows<1>(xp, M, K, wp, ldw, n, yp, N);
  if (bias.has_value()) out.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.view(shape);
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, c10::string_view activation,
                  const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& row_mask) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() &&
              (!bias.has_value() || bias->device().is_cpu()) &&
              (!residual.has_value() || residual->device().is_cpu()) &&
              (!row_mask.has_value() || row_mask->device().is_cpu()),
              "linear: CPU implementation called with non-CPU tensors");
  const LinearSizes sizes = check_linear_args(x, weight, bias, activation, residual, row_mask);
  return linear_epilogue(product(x, weight, bias, sizes), sizes.act, residual, row_mask);
}

}  // namespace anee_fast::cpu
