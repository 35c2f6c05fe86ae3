// Helpers shared by the CPU implementations of the anee_fast ops (csrc/cpu/*.cpp).
// Everything is computed in float32 and stored in the tensors' own dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

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

// ---- GEMV: few float32 rows of x against a weight matrix, AVX2 + FMA (linear, skip_adapter) ----
// gemv() reads each weight row once for all rows of x: one row after the other for a few rows of
// x, four weight rows in flight per thread for more (why not torch's GEMM: linear.cpp). The
// weights may be float32, bfloat16 or float16. Callers check has_avx2_fma() (F16C, for float16
// weights, comes with every AVX2 CPU) and take at::linear otherwise.

// The instruction sets the kernels may use: the CPU's best, or less where the environment
// variable ANEE_FAST_CPU_ISA says so ("avx2", "scalar"): how the tests and benchmarks reach the
// AVX2 and the at::linear paths on an AVX-512 machine. Read once.
enum class CpuIsa { kScalar, kAvx2, kAvx512 };

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::kScalar;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::kAvx2;
    if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      best = CpuIsa::kAvx512;
    const char* env = std::getenv("ANEE_FAST_CPU_ISA");
    const std::string want = env == nullptr ? "" : env;
    if (want == "scalar") return CpuIsa::kScalar;
    if (want == "avx2") return std::min(best, CpuIsa::kAvx2);
    return best;
  }();
  return isa;
}

inline bool has_avx2_fma() { return cpu_isa() >= CpuIsa::kAvx2; }

// AVX-512 F/BW/VL/DQ (Skylake-SP, Zen 4 and later): the quantized GEMVs' faster path.
inline bool has_avx512() { return cpu_isa() >= CpuIsa::kAvx512; }

// Bytes ahead of the weight row being decoded that the quantized GEMVs prefetch into L1
// (weight_gemv.h). Left to the hardware, one core reads the next rows only when it asks for them
// and decodes them only once they are in, so the read and the decoding take turns; a prefetch
// about one scale group ahead makes them overlap on Intel cores (Sapphire Rapids: Q4_1 GEMV
// streamed on 1 thread +17%; decode at full depth +5-10%). On Zen 4 software prefetches slowed it
// down (docs/benchmarks.md), so none on other CPUs. ANEE_FAST_PREFETCH=<bytes> overrides (0: off),
// for benchmarks. Read once.
inline int64_t weight_prefetch_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("ANEE_FAST_PREFETCH");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      TORCH_CHECK(*end == '\0' && v >= 0, "ANEE_FAST_PREFETCH must be a number of bytes >= 0, got '",
                  env, "'");
      return static_cast<int64_t>(v);
    }
    return __builtin_cpu_is("intel") ? int64_t{3072} : int64_t{0};
  }();
  return bytes;
}

// How the AVX-512 one-row 4-bit GEMV turns a weight byte b into a float (weight_gemv.h,
// factored_block_512): as the float 2^23 + b, corrected inside an FMA ("exponent": five
// instructions and three 64-byte loads of x a block), or by a conversion ("convert": six
// instructions, two loads). Intel cores load two 64-byte vectors a cycle, and the first is faster
// there (Sapphire Rapids: +3-9% against the older seven-instruction kernel); Zen 4 runs every
// 512-bit instruction on two 256-bit halves and loads one 64-byte vector a cycle, and the second is
// faster there (the kernel 1.8-2.0 -> 1.5-1.7 ns a block on a 2-core EPYC).
// ANEE_FAST_NIBBLE_FORM=exponent|convert overrides, for tests and benchmarks. Read once.
enum class NibbleForm { kExponent, kConvert };

inline NibbleForm nibble_form() {
  static const NibbleForm form = [] {
    const char* env = std::getenv("ANEE_FAST_NIBBLE_FORM");
    const std::string want = env == nullptr ? "" : env;
    if (want == "exponent") return NibbleForm::kExponent;
    if (want == "convert") return NibbleForm::kConvert;
    TORCH_CHECK(want.empty(), "ANEE_FAST_NIBBLE_FORM must be 'exponent' or 'convert', got '", want,
                "'");
    return __builtin_cpu_is("amd") ? NibbleForm::kConvert : NibbleForm::kExponent;
  }();
  return form;
}

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Eight weights as float32.
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));   // bfloat16: float32's top half
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// y[m, n + i] = x[m] . w[n + i] for i < NR weight rows and m < MB rows of x.
template <typename scalar_t, int NR, int MB>
__attribute__((target("avx2,fma,f16c"))) void dot_tile(const float* x, int64_t ldx,
                                                       const scalar_t* w, int64_t ldw, int64_t K,
                                                       float* y, int64_t ldy) {
  __m256 acc[NR][MB];
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
    for (int i = 0; i < NR; ++i) {
      const __m256 wv = load8(w + i * ldw + k);
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_fmadd_ps(wv, xv[m], acc[i][m]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MB; ++m) {
      float s = horizontal_sum(acc[i][m]);
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[i * ldw + kk]) * x[m * ldx + kk];
      y[m * ldy + i] = s;
    }
}

// NR weight rows from row n against every row of x [M, K], two rows of x at a time.
template <typename scalar_t, int NR>
void dot_rows(const float* x, int64_t M, int64_t K, const scalar_t* w, int64_t ldw, int64_t n,
              float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2)
    dot_tile<scalar_t, NR, 2>(x + m * K, K, w + n * ldw, ldw, K, y + m * N + n, N);
  if (m < M) dot_tile<scalar_t, NR, 1>(x + m * K, K, w + n * ldw, ldw, K, y + m * N + n, N);
}

// y[m * ldy] = x[m] . w for one weight row w and MB rows of x (ldx apart), four FMA chains per
// row of x (one would wait on its own latency).
template <typename scalar_t, int MB>
__attribute__((target("avx2,fma,f16c"))) void dot_row(const float* x, int64_t ldx,
                                                      const scalar_t* w, int64_t K, float* y,
                                                      int64_t ldy) {
  __m256 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int u = 0; u < 4; ++u) {
      const __m256 wv = load8(w + k + 8 * u);
      for (int m = 0; m < MB; ++m)
        acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[m][u]);
    }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8(w + k);
    for (int m = 0; m < MB; ++m)
      acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    float s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]),
                                           _mm256_add_ps(acc[m][2], acc[m][3])));
    for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[kk]) * x[m * ldx + kk];
    y[m * ldy] = s;
  }
}

// Rows of x up to which gemv reads the weight one row at a time: a single sequential stream,
// which the hardware prefetcher follows at the full read bandwidth (four rows interleaved
// streamed float32 at 13 GB/s on the Zen 4 development machine, one row at a time at 23; with
// the weight in cache, or more rows of x, the four rows' shared loads of x win).
constexpr int64_t kStreamRows = 4;

// y [M, N] = x [M, K] @ w [N, K]^T in float32 (w's rows ldw apart), for few rows of x (needs
// has_avx2_fma()). Parallel over weight rows (groups of four past kStreamRows), a thread's run
// at least ~32 KB.
template <typename scalar_t>
void gemv(const float* x, int64_t M, int64_t K, const scalar_t* w, int64_t ldw, int64_t N,
          float* y) {
  if (M <= kStreamRows) {
    const int64_t grain = std::max<int64_t>(
        1, 32768 / std::max<int64_t>(K * static_cast<int64_t>(sizeof(scalar_t)), 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2)
          dot_row<scalar_t, 2>(x + m * K, K, w + n * ldw, K, y + m * N + n, N);
        if (m < M) dot_row<scalar_t, 1>(x + m * K, K, w + n * ldw, K, y + m * N + n, N);
      }
    });
    return;
  }
  const int64_t groups = N / 4;
  at::parallel_for(0, groups, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) dot_rows<scalar_t, 4>(x, M, K, w, ldw, g * 4, y, N);
  });
  for (int64_t n = groups * 4; n < N; ++n) dot_rows<scalar_t, 1>(x, M, K, w, ldw, n, y, N);
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
