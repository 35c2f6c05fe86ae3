// Quantized weight rows (layouts: anee_fast/ops/weight_formats.py, op_checks.h:WeightFormat) on
// the CPU, in the two pieces the kernels need: a block's 32 integers q as float32 in SIMD
// registers, and the blocks' scales d (and minimums m) as float32 arrays. weight_gemv.h
// multiplies with them; the values themselves are d * q + m, one FMA: exactly
// weight_formats.dequantize's (d * q is an exact product, q4_0's d * (q - 8) = d * q + (-8d) is
// representable). dequantize_rows writes them for the path that multiplies with at::linear.
//
// Instruction sets: AVX2 + FMA + F16C always, AVX-512 (F/BW/VL/DQ) where cpu_isa() has it; the
// callers fall back to dequantize_row_scalar / at::linear without AVX2.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../op_checks.h"
#include "cpu_common.h"

#define ANEE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ANEE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace anee_fast::cpu {

inline float load_f32(const uint8_t* p) {   // little endian, unaligned
  float v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float load_f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// ---- scalar: the definition, for CPUs without AVX2 ------------------------------------------

inline void dequantize_row_scalar(WeightFormat f, const uint8_t* row, int64_t K, float* out) {
  if (f == WeightFormat::kInt8) {
    const float s = load_f32(row);
    const int8_t* q = reinterpret_cast<const int8_t*>(row + 4);
    for (int64_t k = 0; k < K; ++k) out[k] = s * static_cast<float>(q[k]);
    return;
  }
  const int64_t bb = block_bytes(f);
  for (int64_t b = 0; b < K / kQuantBlock; ++b, out += kQuantBlock) {
    const uint8_t* blk = row + b * bb;
    const float d = load_f16(blk);
    if (f == WeightFormat::kQ8_0) {
      const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
      for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]);
      continue;
    }
    const bool q4_1 = f == WeightFormat::kQ4_1;
    const uint8_t* qs = blk + (q4_1 ? 4 : 2);
    const float m = q4_1 ? load_f16(blk + 2) : 0.f;
    for (int j = 0; j < 16; ++j) {
      const float lo = static_cast<float>(qs[j] & 15), hi = static_cast<float>(qs[j] >> 4);
      out[j] = q4_1 ? d * lo + m : d * (lo - 8.f);
      out[j + 16] = q4_1 ? d * hi + m : d * (hi - 8.f);
    }
  }
}

// ---- the formats: block bytes, where q starts, how q is packed --------------------------------
// A block's values are d * q + m: q4_1 stores d and m; q4_0 stores d, m = -8d; q8_0 stores d,
// m = 0. int8 has no blocks: one scale s per row (kRowScale), values s * q.

struct Q4_1 {
  static constexpr int64_t kBytes = 20, kQs = 4;
  static constexpr bool kNibbles = true, kHasMin = true, kStoredMin = true, kRowScale = false;
};
struct Q4_0 {
  static constexpr int64_t kBytes = 18, kQs = 2;
  static constexpr bool kNibbles = true, kHasMin = true, kStoredMin = false, kRowScale = false;
};
struct Q8_0 {
  static constexpr int64_t kBytes = 34, kQs = 2;
  static constexpr bool kNibbles = false, kHasMin = false, kStoredMin = false, kRowScale = false;
};
struct Int8 {   // "block" b: values 32b .. 32b + 31 after the row's 4-byte scale
  static constexpr int64_t kBytes = 32, kQs = 4;
  static constexpr bool kNibbles = false, kHasMin = false, kStoredMin = false, kRowScale = true;
};

// ---- q of one block as float32 ---------------------------------------------------------------

// AVX-512: values 0-15 in q[0], 16-31 in q[1]. Nibbles: byte i holds value i (low) and i + 16.
template <class F>
ANEE_AVX512 inline void block_q_512(const uint8_t* row, int64_t b, __m512* q) {
  const uint8_t* p = row + b * F::kBytes + F::kQs;
  if constexpr (F::kNibbles) {
    const __m512i bytes =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    // vpermps reads an index's low 4 bits: the low nibble's value straight from the byte (one
    // instruction where masking and converting take two; faster on Zen 4).
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    q[0] = _mm512_permutexvar_ps(bytes, iota);
    q[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
  } else {
    const __m128i* v = reinterpret_cast<const __m128i*>(p);
    q[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(v)));
    q[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(v + 1)));
  }
}

// AVX2: the 8 bytes at p as dwords, widened straight from memory (one load-and-widen
// instruction, no trip through a general register).
ANEE_AVX2 inline __m256i widen_8_bytes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// AVX2: values 8i .. 8i + 7 in q[i].
template <class F>
ANEE_AVX2 inline void block_q_256(const uint8_t* row, int64_t b, __m256* q) {
  const uint8_t* p = row + b * F::kBytes + F::kQs;
  if constexpr (F::kNibbles) {
    const __m256i b0 = widen_8_bytes(p);
    const __m256i b1 = widen_8_bytes(p + 8);
    const __m256i low = _mm256_set1_epi32(15);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
  } else {
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
  }
}

// ---- the scales of blocks b0 .. b0 + n - 1 of a row: d[j], and m[j] where F::kHasMin ---------

// One at a time, with F16C's conversion (c10::Half's is done in software without -mf16c).
template <class F>
ANEE_AVX2 inline void block_scales_f16c(const uint8_t* row, int64_t b0, int64_t n, float* d,
                                        float* m) {
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* blk = row + (b0 + j) * F::kBytes;
    uint16_t bits[2];
    std::memcpy(bits, blk, F::kStoredMin ? 4 : 2);
    d[j] = _cvtsh_ss(bits[0]);
    if constexpr (F::kStoredMin) m[j] = _cvtsh_ss(bits[1]);
    else if constexpr (F::kHasMin) m[j] = -8.f * d[j];
  }
}

// AVX-512: sixteen blocks' float16 scales picked out of the row's bytes with two-register word
// permutes (a gather is slow on Zen 4) and converted at once. The index vectors depend only on
// the format: built once per thread by ScalePicker's constructor.
template <class F>
struct ScalePicker {
  static constexpr int64_t kWords = F::kBytes / 2;                 // a block's stride in words
  static constexpr int64_t kSpan = 15 * F::kBytes + (F::kStoredMin ? 4 : 2);   // bytes read
  static constexpr int kLoads = static_cast<int>((kSpan + 63) / 64);
  static constexpr int kPairs = (kLoads + 1) / 2;
  __m512i index[kPairs];
  __mmask32 lanes[kPairs];

  // Word lane L < 16 gets block L's d, lane 16 + L its m (q4_1).
  ANEE_AVX512 ScalePicker() {
    alignas(64) int16_t idx[kPairs][32];
    uint32_t mask[kPairs] = {};
    for (int L = 0; L < 32; ++L) {
      const int64_t word = (L % 16) * kWords + (L >= 16 && F::kStoredMin ? 1 : 0);
      const int64_t pair = std::min<int64_t>(word / 64, kPairs - 1);
      for (int p = 0; p < kPairs; ++p) idx[p][L] = static_cast<int16_t>(p == pair ? word % 64 : 0);
      mask[pair] |= 1u << L;
    }
    for (int p = 0; p < kPairs; ++p) {
      index[p] = _mm512_load_si512(idx[p]);
      lanes[p] = mask[p];
    }
  }

  // d[0 .. 15], m[0 .. 15] of blocks b0 .. b0 + 15 (only the first n are read from the row: a
  // masked load never touches the bytes past them).
  ANEE_AVX512 void pick(const uint8_t* row, int64_t b0, int64_t n, float* d, float* m) const {
    const uint8_t* p = row + b0 * F::kBytes;
    const int64_t bytes = n * F::kBytes;
    __m512i z[2 * kPairs];
    for (int l = 0; l < 2 * kPairs; ++l) {
      const int64_t valid = bytes - 64 * l;
      const __mmask64 k = l >= kLoads || valid <= 0 ? 0
                          : valid >= 64              ? ~__mmask64{0}
                                                     : (__mmask64{1} << valid) - 1;
      z[l] = _mm512_maskz_loadu_epi8(k, p + 64 * l);
    }
    __m512i words = _mm512_setzero_si512();
    for (int q = 0; q < kPairs; ++q)
      words = _mm512_mask_mov_epi16(words, lanes[q],
                                    _mm512_permutex2var_epi16(z[2 * q], index[q], z[2 * q + 1]));
    const __m512 dv = _mm512_cvtph_ps(_mm512_castsi512_si256(words));
    _mm512_storeu_ps(d, dv);
    if constexpr (F::kStoredMin)
      _mm512_storeu_ps(m, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(words, 1)));
    else if constexpr (F::kHasMin) _mm512_storeu_ps(m, _mm512_mul_ps(dv, _mm512_set1_ps(-8.f)));
  }
};

// ---- dequantize_rows: float32 rows n0 .. n1 - 1 of a quantized weight ------------------------

constexpr int64_t kScaleChunk = 64;   // blocks whose scales are converted at a time

template <class F>
ANEE_AVX512 void dequantize_rows_512(const uint8_t* w, int64_t ldw, int64_t K, int64_t n0,
                                     int64_t n1, float* out, int64_t ldo) {
  const int64_t blocks = K / kQuantBlock;
  alignas(64) float d[kScaleChunk], m[kScaleChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * ldw;
    float* o = out + (n - n0) * ldo;
    const float s = F::kRowScale ? load_f32(row) : 1.f;
    for (int64_t c0 = 0; c0 < blocks; c0 += kScaleChunk) {
      const int64_t cn = std::min(kScaleChunk, blocks - c0);
      if constexpr (!F::kRowScale) block_scales_f16c<F>(row, c0, cn, d, m);
      for (int64_t b = c0; b < c0 + cn; ++b) {
        __m512 q[2];
        block_q_512<F>(row, b, q);
        const __m512 dv = _mm512_set1_ps(F::kRowScale ? s : d[b - c0]);
        for (int i = 0; i < 2; ++i) {
          __m512 v;
          if constexpr (F::kHasMin) v = _mm512_fmadd_ps(q[i], dv, _mm512_set1_ps(m[b - c0]));
          else v = _mm512_mul_ps(q[i], dv);
          _mm512_storeu_ps(o + b * 32 + 16 * i, v);
        }
      }
    }
    for (int64_t k = blocks * kQuantBlock; k < K; ++k)   // int8 only
      o[k] = s * static_cast<float>(static_cast<int8_t>(row[4 + k]));
  }
}

template <class F>
ANEE_AVX2 void dequantize_rows_256(const uint8_t* w, int64_t ldw, int64_t K, int64_t n0,
                                   int64_t n1, float* out, int64_t ldo) {
  const int64_t blocks = K / kQuantBlock;
  alignas(64) float d[kScaleChunk], m[kScaleChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * ldw;
    float* o = out + (n - n0) * ldo;
    const float s = F::kRowScale ? load_f32(row) : 1.f;
    for (int64_t c0 = 0; c0 < blocks; c0 += kScaleChunk) {
      const int64_t cn = std::min(kScaleChunk, blocks - c0);
      if constexpr (!F::kRowScale) block_scales_f16c<F>(row, c0, cn, d, m);
      for (int64_t b = c0; b < c0 + cn; ++b) {
        __m256 q[4];
        block_q_256<F>(row, b, q);
        const __m256 dv = _mm256_set1_ps(F::kRowScale ? s : d[b - c0]);
        for (int i = 0; i < 4; ++i) {
          __m256 v;
          if constexpr (F::kHasMin) v = _mm256_fmadd_ps(q[i], dv, _mm256_set1_ps(m[b - c0]));
          else v = _mm256_mul_ps(q[i], dv);
          _mm256_storeu_ps(o + b * 32 + 8 * i, v);
        }
      }
    }
    for (int64_t k = blocks * kQuantBlock; k < K; ++k)
      o[k] = s * static_cast<float>(static_cast<int8_t>(row[4 + k]));
  }
}

inline void dequantize_rows_scalar(WeightFormat f, const uint8_t* w, int64_t ldw, int64_t K,
                                   int64_t n0, int64_t n1, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n) dequantize_row_scalar(f, w + n * ldw, K, out + (n - n0) * ldo);
}

using DequantizeFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

template <class F>
DequantizeFn dequantize_fn() {
  if (has_avx512()) return dequantize_rows_512<F>;
  return has_avx2_fma() ? dequantize_rows_256<F> : nullptr;
}

// The fastest dequantize_rows for format f on this CPU (nullptr: use dequantize_rows_scalar).
inline DequantizeFn dequantize_fn(WeightFormat f) {
  switch (f) {
    case WeightFormat::kInt8: return dequantize_fn<Int8>();
    case WeightFormat::kQ8_0: return dequantize_fn<Q8_0>();
    case WeightFormat::kQ4_0: return dequantize_fn<Q4_0>();
    case WeightFormat::kQ4_1: return dequantize_fn<Q4_1>();
    default: return nullptr;
  }
}

// out [n1 - n0, K] (rows ldo floats apart) = rows n0 .. n1 - 1 of the weight in float32, in
// parallel over rows.
inline void dequantize_rows(WeightFormat f, const uint8_t* w, int64_t ldw, int64_t K, int64_t n0,
                            int64_t n1, float* out, int64_t ldo) {
  const DequantizeFn fn = dequantize_fn(f);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(n0, n1, grain, [&](int64_t begin, int64_t end) {
    if (fn != nullptr) {
      fn(w, ldw, K, begin, end, out + (begin - n0) * ldo, ldo);
    } else {
      dequantize_rows_scalar(f, w, ldw, K, begin, end, out + (begin - n0) * ldo, ldo);
    }
  });
}

}  // namespace anee_fast::cpu
