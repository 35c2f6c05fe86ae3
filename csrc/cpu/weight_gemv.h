// GEMV of a few float32 rows of x against a quantized weight (weight_decode.h): y [M, N] =
// x [M, K] @ W^T in float32, the weight's blocks decoded in registers as they stream in.
//
// A decode step reads every weight once, so the kernel's speed is bytes per weight and how close
// it gets to the memory's read bandwidth; on one core decoding is the limit, so it takes as few
// instructions per block as it can. x stays float32 (no int8 dot products):
//   - one row of x (a decode step): the block's scale is factored out, sum_j (d q_j + m) x_j =
//     d * sum_j q_j x_j + m * sum_j x_j, with x's block sums computed once per call and the m
//     terms added sixteen blocks per FMA: the dequantized product up to float32 rounding of that
//     reassociated sum (int8: s * sum q x likewise; 4-bit q against a rearranged x, see
//     factored_block_512);
//   - more rows: each block is dequantized to its exact values once (one FMA per 16) and meets up
//     to kTileRows rows of x while in registers: the dequantized product up to summation order.
// The scales d and m are converted to float32 sixteen blocks at a time (ScalePicker). The weight
// rows go one after the other (rows_512 says why); parallel over rows (at::parallel_for).
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "../op_checks.h"
#include "cpu_common.h"
#include "weight_decode.h"

namespace anee_fast::cpu {

// Blocks whose scales are converted in one go (rows_512's groups): the conversion reads the
// group's bytes first, so it is the demand stream from memory and the decoding that follows hits
// the caches; small groups keep the two close enough to overlap (on Zen 4, 512 blocks a group
// streamed q8_0 at 11.7 GB/s and q4_1 at 9.7, 144 blocks at 15.6 and 11.3). 144 = 9 x 16:
// sixteen-block conversions without a partial one for K = 576 (8 rows) and 1536 (3 rows).
constexpr int64_t kScaleBlocks = 144;
constexpr int kTileRows = 8;           // rows of x a weight block meets while in registers

// The rows of x as the kernels read them: copied to 64-byte aligned rows (a 64-byte load that
// straddles two cache lines costs two), their sums per block of 32 (for the m terms), and for
// 4-bit formats the nibble form xn that the one-row kernel reads (factored_block_512 says why).
struct Activations {
  static constexpr int64_t kNibbleFloats = 48;   // xn's floats per block of 32 values
  int64_t M, K;
  int64_t ldx, ldxs, ldxn;    // floats between rows of x, xsum and xn (multiples of 16)
  const float* x;
  const float* xsum;          // [M, ldxs], zero past the last block
  const float* xn = nullptr;  // [M, ldxn] with nibbles: per block x0 - x1/16 | x1/16 | -2^23 x1/16
  std::unique_ptr<float, decltype(&std::free)> buf{nullptr, &std::free};

  Activations(const float* src, int64_t M_, int64_t K_, bool nibbles) : M(M_), K(K_) {
    const int64_t blocks = K / kQuantBlock;
    ldx = (K + 15) / 16 * 16;
    ldxs = (blocks + 15) / 16 * 16;
    ldxn = nibbles ? blocks * kNibbleFloats : 0;
    const size_t floats = static_cast<size_t>(M * (ldx + ldxs + ldxn)) + 16;   // a multiple of 16
    buf.reset(static_cast<float*>(std::aligned_alloc(64, floats * sizeof(float))));
    TORCH_CHECK(buf != nullptr, "linear: out of memory for the activations");
    float* xb = buf.get();
    float* sb = xb + M * ldx;
    float* nb = sb + M * ldxs;
    for (int64_t m = 0; m < M; ++m) {
      std::copy(src + m * K, src + (m + 1) * K, xb + m * ldx);
      std::fill(xb + m * ldx + K, xb + (m + 1) * ldx, 0.f);
      std::fill(sb + m * ldxs, sb + (m + 1) * ldxs, 0.f);
      for (int64_t b = 0; b < blocks; ++b) {
        const float* xk = src + m * K + b * kQuantBlock;
        float s = 0.f;
        for (int j = 0; j < kQuantBlock; ++j) s += xk[j];
        sb[m * ldxs + b] = s;
        if (!nibbles) continue;
        float* n = nb + m * ldxn + b * kNibbleFloats;
        for (int j = 0; j < 16; ++j) {
          n[j] = xk[j] - xk[16 + j] * 0.0625f;
          n[16 + j] = xk[16 + j] * 0.0625f;
          n[32 + j] = -8388608.f * n[16 + j];
        }
      }
    }
    x = xb;
    xsum = sb;
    if (nibbles) xn = nb;
  }
};

// Asks for the bytes [p, p + n) into L1 (weight_prefetch_bytes says why and how far ahead).
inline void prefetch_bytes(const uint8_t* p, int64_t n) {
  for (int64_t off = 0; off < n; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T0);
}

// int8's last K % 32 values of a row against x: sum of (scale * q) x.
inline float int8_tail(const uint8_t* row, float scale, const float* x, int64_t K) {
  float sum = 0.f;
  for (int64_t k = K / kQuantBlock * kQuantBlock; k < K; ++k)
    sum += scale * static_cast<float>(static_cast<int8_t>(row[4 + k])) * x[k];
  return sum;
}

// ---- AVX-512 --------------------------------------------------------------------------------

// sums[i] = the sum of acc[i]'s lanes, i < MB (2, 4 or 8): a tree of 128-bit lane shuffles
// shared by all MB (a reduction per accumulator costs about three times as much).
template <int MB>
ANEE_AVX512 inline void reduce_512(const __m512* acc, float* sums) {
  __m512 v[8];
  for (int i = 0; i < 8; ++i) v[i] = i < MB ? acc[i] : _mm512_setzero_ps();
  __m512 p[4], q[2];
  for (int i = 0; i < 4; ++i)   // p[i] 128-bit lanes: v[2i] halves summed, v[2i+1] halves summed
    p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)   // q[i] lane k: row 4i + k's four partial sums
    q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xDD));
  __m512 s = _mm512_add_ps(_mm512_unpacklo_ps(q[0], q[1]), _mm512_unpackhi_ps(q[0], q[1]));
  s = _mm512_add_ps(s, _mm512_shuffle_ps(s, s, 0x4E));   // lane k: rows k and 4 + k, twice
  alignas(64) float out[16];
  _mm512_store_ps(out, s);
  for (int i = 0; i < MB; ++i) sums[i] = out[(i % 4) * 4 + i / 4];
}

// A 4-bit format whose one-row kernel converts each weight byte to a float (NibbleForm::kConvert,
// cpu_common.h) instead of reading it as 2^23 + b: rows_fn() picks rows_512<Converted<F>>.
template <class F>
struct Converted : F {};
template <class F>
constexpr bool kConverted = false;
template <class F>
constexpr bool kConverted<Converted<F>> = true;

// One block of a row against one row of x, its scale d applied last. 4-bit q: byte j holds
// values j (its low nibble lo) and j + 16 (high, hi); with the whole byte b = lo + 16 hi,
//   lo x0 + hi x1 = lo (x0 - x1/16) + b (x1/16),
// the nibble form xn of x (Activations). A permute reads lo as a float from the low bits of the
// dword that holds b (vpermps reads an index's low four bits). b as a float, by nibble_form():
//   - exponent: one byte shuffle puts b into the mantissa of the float f = 2^23 + b, and the FMA
//     f (x1/16) + (-2^23 x1/16) is b (x1/16) rounded once, as a product would be: five
//     instructions a block (a shuffle, a permute, three FMAs), three loads of xn;
//   - convert: the 16 bytes widened to dwords and converted: six instructions, two loads of xn.
// Either is the same sum up to float32 rounding (x1/16 and 2^23 x1/16 are exact); converting lo
// and hi apart takes seven instructions.
template <class F>
ANEE_AVX512 inline void factored_block_512(const uint8_t* row, int64_t b, float d, const float* x,
                                           const float* xn, __m512& acc) {
  if constexpr (F::kNibbles) {
    const __m128i bytes =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * F::kBytes + F::kQs));
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float* nb = xn + b * Activations::kNibbleFloats;
    __m512 s;
    if constexpr (kConverted<F>) {
      const __m512i wide = _mm512_cvtepu8_epi32(bytes);
      s = _mm512_mul_ps(_mm512_cvtepi32_ps(wide), _mm512_load_ps(nb + 16));
      s = _mm512_fmadd_ps(_mm512_permutexvar_ps(wide, iota), _mm512_load_ps(nb), s);
    } else {
      // dword j: byte j of the block's 16 in its low byte, 0x4B (2^23's exponent) in its high one
      const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i f = _mm512_mask_shuffle_epi8(_mm512_set1_epi32(0x4B000000),
                                                 __mmask64{0x1111111111111111},
                                                 _mm512_broadcast_i32x4(bytes), lanes);
      s = _mm512_fmadd_ps(_mm512_castsi512_ps(f), _mm512_load_ps(nb + 16), _mm512_load_ps(nb + 32));
      s = _mm512_fmadd_ps(_mm512_permutexvar_ps(f, iota), _mm512_load_ps(nb), s);
    }
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc);
    return;
  }
  __m512 q[2];
  block_q_512<F>(row, b, q);
  const float* xb = x + b * 32;
  if constexpr (F::kRowScale) {     // int8: the row's scale comes last
    acc = _mm512_fmadd_ps(q[0], _mm512_load_ps(xb), acc);
    acc = _mm512_fmadd_ps(q[1], _mm512_load_ps(xb + 16), acc);
  } else {
    __m512 s = _mm512_mul_ps(q[0], _mm512_load_ps(xb));
    s = _mm512_fmadd_ps(q[1], _mm512_load_ps(xb + 16), s);
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc);
  }
}

// Blocks b0 .. b1 - 1 of one weight row against row m0 of x, the block scale factored out (see
// the top); d[j], m[j]: the scales of block b0 + j. The accumulator, its lanes not yet summed
// (int8: before the row's scale and tail, see finish_factored).
template <class F>
ANEE_AVX512 inline __m512 factored_row_512(const uint8_t* row, int64_t b0, int64_t b1,
                                           const float* d, const float* m, const Activations& a,
                                           int64_t m0) {
  const float* x = a.x + m0 * a.ldx;
  const float* xn = a.xn == nullptr ? nullptr : a.xn + m0 * a.ldxn;
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};   // two FMA chains
  if constexpr (F::kHasMin) {   // m * (sum of x over the block), sixteen blocks per FMA
    const float* xs = a.xsum + m0 * a.ldxs + b0;
    for (int64_t j = 0; j < b1 - b0; j += 16) {
      const int64_t left = b1 - b0 - j;
      const __mmask16 k = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      acc[1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, m + j), _mm512_maskz_loadu_ps(k, xs + j),
                               acc[1]);
    }
  }
  int64_t b = b0;
  for (; b + 2 <= b1; b += 2) {
    factored_block_512<F>(row, b, d[b - b0], x, xn, acc[0]);
    factored_block_512<F>(row, b + 1, d[b + 1 - b0], x, xn, acc[1]);
  }
  if (b < b1) factored_block_512<F>(row, b, d[b - b0], x, xn, acc[0]);
  return _mm512_add_ps(acc[0], acc[1]);
}

// A factored row's result from its summed lanes: int8 adds the tail and applies the row's scale.
template <class F>
inline float finish_factored(const uint8_t* row, float sum, const Activations& a, int64_t m0) {
  if constexpr (F::kRowScale)
    return load_f32(row) * (sum + int8_tail(row, 1.f, a.x + m0 * a.ldx, a.K));
  return sum;
}

// Blocks b0 .. b1 - 1 of one weight row against rows m0 .. m0 + MB - 1 of x; d[j], m[j]: the
// scales of block b0 + j. The MB partial sums to sums[].
template <class F, int MB>
ANEE_AVX512 inline void chunk_512(const uint8_t* row, int64_t b0, int64_t b1, const float* d,
                                  const float* m, const Activations& a, int64_t m0, float* sums) {
  const float* x = a.x + m0 * a.ldx;
  if constexpr (MB == 1) {
    const __m512 acc = factored_row_512<F>(row, b0, b1, d, m, a, m0);
    sums[0] = finish_factored<F>(row, _mm512_reduce_add_ps(acc), a, m0);
  } else {
    __m512 acc[MB];
    for (int mm = 0; mm < MB; ++mm) acc[mm] = _mm512_setzero_ps();
    const __m512 s = _mm512_set1_ps(F::kRowScale ? load_f32(row) : 0.f);
    for (int64_t b = b0; b < b1; ++b) {
      __m512 w[2];
      block_q_512<F>(row, b, w);
      for (int i = 0; i < 2; ++i) {
        if constexpr (F::kRowScale) w[i] = _mm512_mul_ps(w[i], s);
        else if constexpr (F::kHasMin)
          w[i] = _mm512_fmadd_ps(w[i], _mm512_set1_ps(d[b - b0]), _mm512_set1_ps(m[b - b0]));
        else w[i] = _mm512_mul_ps(w[i], _mm512_set1_ps(d[b - b0]));
      }
      for (int mm = 0; mm < MB; ++mm) {
        acc[mm] = _mm512_fmadd_ps(w[0], _mm512_load_ps(x + mm * a.ldx + b * 32), acc[mm]);
        acc[mm] = _mm512_fmadd_ps(w[1], _mm512_load_ps(x + mm * a.ldx + b * 32 + 16), acc[mm]);
      }
    }
    reduce_512<MB>(acc, sums);
    if constexpr (F::kRowScale)
      for (int mm = 0; mm < MB; ++mm)
        sums[mm] += int8_tail(row, load_f32(row), x + mm * a.ldx, a.K);
  }
}

// Blocks b0 .. b1 - 1 of a (long) row against all rows of x, in tiles of up to kTileRows (the
// blocks stay in L1 between tiles); the sums to y[mm * N] (= when first, else +=).
template <class F>
ANEE_AVX512 inline void chunk_rows_512(const uint8_t* row, int64_t b0, int64_t b1, const float* d,
                                       const float* m, const Activations& a, float* y, int64_t N,
                                       bool first) {
  float sums[kTileRows];
  for (int64_t m0 = 0; m0 < a.M;) {
    const int64_t left = a.M - m0;
    const int tile = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    switch (tile) {
      case 8: chunk_512<F, 8>(row, b0, b1, d, m, a, m0, sums); break;
      case 4: chunk_512<F, 4>(row, b0, b1, d, m, a, m0, sums); break;
      case 2: chunk_512<F, 2>(row, b0, b1, d, m, a, m0, sums); break;
      default: chunk_512<F, 1>(row, b0, b1, d, m, a, m0, sums); break;
    }
    for (int i = 0; i < tile; ++i) y[(m0 + i) * N] = first ? sums[i] : y[(m0 + i) * N] + sums[i];
    m0 += tile;
  }
}

template <class F>
ANEE_AVX512 void pick_scales(const ScalePicker<F>& picker, const uint8_t* from, int64_t n, float* d,
                             float* m) {
  for (int64_t j = 0; j < n; j += 16)
    picker.pick(from, j, std::min<int64_t>(16, n - j), d + j, m + j);
}

// Weight rows n0 .. n1 - 1 of y [M, N] (a thread's share). One weight row at a time: the rows
// are one sequential stream, which the hardware prefetcher follows (two or four rows interleaved
// ran at half of the read bandwidth on Zen 4); each row, the bytes weight_prefetch_bytes() ahead
// are asked for where that helps (Intel). Rows of up to kScaleBlocks blocks are taken in groups whose
// scales are converted together (sixteen blocks at a time across the rows when they are
// contiguous); a longer row's scales a chunk at a time.
template <class F>
ANEE_AVX512 void rows_512(const Activations& a, const uint8_t* w, int64_t ldw, int64_t n0,
                          int64_t n1, float* y, int64_t N) {
  const ScalePicker<F> picker;
  const int64_t ahead = weight_prefetch_bytes();
  alignas(64) float d[kScaleBlocks + 16], m[kScaleBlocks + 16];
  const int64_t blocks = a.K / kQuantBlock;
  const bool whole = F::kRowScale || blocks <= kScaleBlocks;   // a row's scales fit the buffers
  const int64_t group = !whole || F::kRowScale || blocks == 0 ? 1 : kScaleBlocks / blocks;
  // A decode step (one row of x) collects the rows' accumulators and sums their lanes eight
  // rows at a time (reduce_512).
  const bool batched = whole && a.M == 1;
  __m512 pending[8];
  int np = 0;
  for (int64_t n = n0; n < n1; n += group) {
    const int64_t rows = std::min(group, n1 - n);
    if (!F::kRowScale && whole) {
      if (ldw == blocks * F::kBytes) {   // contiguous rows: their blocks are one array
        pick_scales(picker, w + n * ldw, rows * blocks, d, m);
      } else {
        for (int64_t i = 0; i < rows; ++i)
          pick_scales(picker, w + (n + i) * ldw, blocks, d + i * blocks, m + i * blocks);
      }
    }
    if (whole && !batched) {   // tiles of x outside the rows: a tile stays in L1 for the group
      for (int64_t m0 = 0; m0 < a.M;) {
        const int64_t left = a.M - m0;
        const int tile = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        for (int64_t i = 0; i < rows; ++i) {
          float sums[kTileRows];
          const uint8_t* row = w + (n + i) * ldw;
          if (m0 == 0 && ahead > 0) prefetch_bytes(row + ahead, ldw);
          const float* dd = d + i * blocks;
          const float* mm = m + i * blocks;
          switch (tile) {
            case 8: chunk_512<F, 8>(row, 0, blocks, dd, mm, a, m0, sums); break;
            case 4: chunk_512<F, 4>(row, 0, blocks, dd, mm, a, m0, sums); break;
            case 2: chunk_512<F, 2>(row, 0, blocks, dd, mm, a, m0, sums); break;
            default: chunk_512<F, 1>(row, 0, blocks, dd, mm, a, m0, sums); break;
          }
          for (int t = 0; t < tile; ++t) y[(m0 + t) * N + n + i] = sums[t];
        }
        m0 += tile;
      }
      continue;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const uint8_t* row = w + (n + i) * ldw;
      if (batched) {
        if (ahead > 0) prefetch_bytes(row + ahead, ldw);
        pending[np++] = factored_row_512<F>(row, 0, blocks, d + i * blocks, m + i * blocks, a, 0);
        if (np == 8) {
          float sums[8];
          reduce_512<8>(pending, sums);
          for (int r = 0; r < 8; ++r)
            y[n + i - 7 + r] = finish_factored<F>(w + (n + i - 7 + r) * ldw, sums[r], a, 0);
          np = 0;
        }
      } else {
        for (int64_t c0 = 0; c0 < blocks; c0 += kScaleBlocks) {
          const int64_t cn = std::min(kScaleBlocks, blocks - c0);
          if (ahead > 0) prefetch_bytes(row + c0 * F::kBytes + ahead, cn * F::kBytes);
          pick_scales(picker, row + c0 * F::kBytes, cn, d, m);
          chunk_rows_512<F>(row, c0, c0 + cn, d, m, a, y + n + i, N, c0 == 0);
        }
      }
    }
  }
  if (np > 0) {   // the last rows of a batch
    float sums[8];
    reduce_512<8>(pending, sums);
    for (int r = 0; r < np; ++r)
      y[n1 - np + r] = finish_factored<F>(w + (n1 - np + r) * ldw, sums[r], a, 0);
  }
}

// ---- AVX2 (the same structure in 256-bit registers; scales converted one at a time) ----------

// As factored_block_512; 4-bit q: lo by a mask and a conversion, b by a conversion (an 8-lane
// permute reads only three index bits), against the first two thirds of xn.
template <class F>
ANEE_AVX2 inline void factored_block_256(const uint8_t* row, int64_t b, float d, const float* x,
                                         const float* xn, __m256& acc) {
  if constexpr (F::kNibbles) {
    const uint8_t* p = row + b * F::kBytes + F::kQs;
    const float* nb = xn + b * Activations::kNibbleFloats;
    const __m256i low = _mm256_set1_epi32(15);
    __m256 s = _mm256_setzero_ps();
    for (int i = 0; i < 2; ++i) {        // bytes 8i .. 8i + 7
      const __m256i bytes = widen_8_bytes(p + 8 * i);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, low)),
                          _mm256_load_ps(nb + 8 * i), s);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(bytes), _mm256_load_ps(nb + 16 + 8 * i), s);
    }
    acc = _mm256_fmadd_ps(s, _mm256_set1_ps(d), acc);
    return;
  }
  __m256 q[4];
  block_q_256<F>(row, b, q);
  const float* xb = x + b * 32;
  if constexpr (F::kRowScale) {
    for (int i = 0; i < 4; ++i) acc = _mm256_fmadd_ps(q[i], _mm256_load_ps(xb + 8 * i), acc);
  } else {
    __m256 s = _mm256_mul_ps(q[0], _mm256_load_ps(xb));
    for (int i = 1; i < 4; ++i) s = _mm256_fmadd_ps(q[i], _mm256_load_ps(xb + 8 * i), s);
    acc = _mm256_fmadd_ps(s, _mm256_set1_ps(d), acc);
  }
}

template <class F, int MB>
ANEE_AVX2 inline void chunk_256(const uint8_t* row, int64_t b0, int64_t b1, const float* d,
                                const float* m, const Activations& a, int64_t m0, float* sums) {
  const float* x = a.x + m0 * a.ldx;
  if constexpr (MB == 1) {
    const float* xn = a.xn == nullptr ? nullptr : a.xn + m0 * a.ldxn;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    if constexpr (F::kHasMin) {
      const float* xs = a.xsum + m0 * a.ldxs + b0;
      int64_t j = 0;
      for (; j + 8 <= b1 - b0; j += 8)
        acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(m + j), _mm256_loadu_ps(xs + j), acc[1]);
      float rest = 0.f;
      for (; j < b1 - b0; ++j) rest += m[j] * xs[j];
      acc[1] = _mm256_add_ps(acc[1], _mm256_setr_ps(rest, 0, 0, 0, 0, 0, 0, 0));
    }
    int64_t b = b0;
    for (; b + 2 <= b1; b += 2) {
      factored_block_256<F>(row, b, d[b - b0], x, xn, acc[0]);
      factored_block_256<F>(row, b + 1, d[b + 1 - b0], x, xn, acc[1]);
    }
    if (b < b1) factored_block_256<F>(row, b, d[b - b0], x, xn, acc[0]);
    sums[0] = horizontal_sum(_mm256_add_ps(acc[0], acc[1]));
    if constexpr (F::kRowScale) sums[0] = load_f32(row) * (sums[0] + int8_tail(row, 1.f, x, a.K));
  } else {
    __m256 acc[MB];
    for (int mm = 0; mm < MB; ++mm) acc[mm] = _mm256_setzero_ps();
    const __m256 s = _mm256_set1_ps(F::kRowScale ? load_f32(row) : 0.f);
    for (int64_t b = b0; b < b1; ++b) {
      __m256 w[4];
      block_q_256<F>(row, b, w);
      for (int i = 0; i < 4; ++i) {
        if constexpr (F::kRowScale) w[i] = _mm256_mul_ps(w[i], s);
        else if constexpr (F::kHasMin)
          w[i] = _mm256_fmadd_ps(w[i], _mm256_set1_ps(d[b - b0]), _mm256_set1_ps(m[b - b0]));
        else w[i] = _mm256_mul_ps(w[i], _mm256_set1_ps(d[b - b0]));
      }
      for (int mm = 0; mm < MB; ++mm)
        for (int i = 0; i < 4; ++i)
          acc[mm] = _mm256_fmadd_ps(w[i], _mm256_load_ps(x + mm * a.ldx + b * 32 + 8 * i), acc[mm]);
    }
    for (int mm = 0; mm < MB; ++mm) {
      sums[mm] = horizontal_sum(acc[mm]);
      if constexpr (F::kRowScale) sums[mm] += int8_tail(row, load_f32(row), x + mm * a.ldx, a.K);
    }
  }
}

template <class F>
ANEE_AVX2 inline void chunk_rows_256(const uint8_t* row, int64_t b0, int64_t b1, const float* d,
                                     const float* m, const Activations& a, float* y, int64_t N,
                                     bool first) {
  float sums[kTileRows];
  for (int64_t m0 = 0; m0 < a.M;) {
    const int64_t left = a.M - m0;
    // 16 registers: tiles of at most four rows of x next to a block's four registers
    const int tile = left >= 4 ? 4 : left >= 2 ? 2 : 1;
    switch (tile) {
      case 4: chunk_256<F, 4>(row, b0, b1, d, m, a, m0, sums); break;
      case 2: chunk_256<F, 2>(row, b0, b1, d, m, a, m0, sums); break;
      default: chunk_256<F, 1>(row, b0, b1, d, m, a, m0, sums); break;
    }
    for (int i = 0; i < tile; ++i) y[(m0 + i) * N] = first ? sums[i] : y[(m0 + i) * N] + sums[i];
    m0 += tile;
  }
}

template <class F>
ANEE_AVX2 void rows_256(const Activations& a, const uint8_t* w, int64_t ldw, int64_t n0,
                        int64_t n1, float* y, int64_t N) {
  const int64_t ahead = weight_prefetch_bytes();
  alignas(32) float d[kScaleBlocks], m[kScaleBlocks];
  const int64_t blocks = a.K / kQuantBlock;
  const bool whole = F::kRowScale || blocks <= kScaleBlocks;
  const int64_t group = !whole || F::kRowScale || blocks == 0 ? 1 : kScaleBlocks / blocks;
  for (int64_t n = n0; n < n1; n += group) {
    const int64_t rows = std::min(group, n1 - n);
    if (whole) {   // as rows_512: the group's scales, then each tile of x over the group's rows
      if constexpr (!F::kRowScale)
        for (int64_t i = 0; i < rows; ++i)
          block_scales_f16c<F>(w + (n + i) * ldw, 0, blocks, d + i * blocks, m + i * blocks);
      for (int64_t m0 = 0; m0 < a.M;) {
        const int64_t left = a.M - m0;
        const int tile = left >= 4 ? 4 : left >= 2 ? 2 : 1;   // 16 registers: up to four rows
        for (int64_t i = 0; i < rows; ++i) {
          float sums[4];
          const uint8_t* row = w + (n + i) * ldw;
          if (m0 == 0 && ahead > 0) prefetch_bytes(row + ahead, ldw);
          const float* dd = d + i * blocks;
          const float* mm = m + i * blocks;
          switch (tile) {
            case 4: chunk_256<F, 4>(row, 0, blocks, dd, mm, a, m0, sums); break;
            case 2: chunk_256<F, 2>(row, 0, blocks, dd, mm, a, m0, sums); break;
            default: chunk_256<F, 1>(row, 0, blocks, dd, mm, a, m0, sums); break;
          }
          for (int t = 0; t < tile; ++t) y[(m0 + t) * N + n + i] = sums[t];
        }
        m0 += tile;
      }
      continue;
    }
    const uint8_t* row = w + n * ldw;   // a long row: its scales a chunk at a time
    for (int64_t c0 = 0; c0 < blocks; c0 += kScaleBlocks) {
      const int64_t cn = std::min(kScaleBlocks, blocks - c0);
      if (ahead > 0) prefetch_bytes(row + c0 * F::kBytes + ahead, cn * F::kBytes);
      block_scales_f16c<F>(row, c0, cn, d, m);
      chunk_rows_256<F>(row, c0, c0 + cn, d, m, a, y + n, N, c0 == 0);
    }
  }
}

// ---- dispatch --------------------------------------------------------------------------------

using RowsFn = void (*)(const Activations&, const uint8_t*, int64_t, int64_t, int64_t, float*,
                        int64_t);

template <class F>
RowsFn rows_fn() {
  if constexpr (F::kNibbles) {
    const NibbleForm form = nibble_form();   // read, and checked, on every CPU
    if (has_avx512() && form == NibbleForm::kConvert) return rows_512<Converted<F>>;
  }
  return has_avx512() ? rows_512<F> : rows_256<F>;
}

inline RowsFn rows_fn(WeightFormat f) {
  switch (f) {
    case WeightFormat::kInt8: return rows_fn<Int8>();
    case WeightFormat::kQ8_0: return rows_fn<Q8_0>();
    case WeightFormat::kQ4_0: return rows_fn<Q4_0>();
    default: return rows_fn<Q4_1>();
  }
}

// y [M, N] = x [M, K] @ W^T for a quantized W (rows ldw bytes apart, format f), M >= 1 rows of
// float32 x (contiguous; linear.cpp sends up to kMaxRows); needs has_avx2_fma().
inline void quantized_gemv(WeightFormat f, const float* x, int64_t M, int64_t K, const uint8_t* w,
                           int64_t ldw, int64_t N, float* y) {
  const Activations a(x, M, K, f == WeightFormat::kQ4_0 || f == WeightFormat::kQ4_1);
  const RowsFn fn = rows_fn(f);
  // Parallel over rows, a thread's share at least ~32 KB of weights (less with more rows of x).
  const int64_t row_bytes = weight_row_bytes(f, K);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_bytes * M, 1));
  at::parallel_for(0, N, grain,
                   [&](int64_t begin, int64_t end) { fn(a, w, ldw, begin, end, y, N); });
}

}  // namespace anee_fast::cpu
