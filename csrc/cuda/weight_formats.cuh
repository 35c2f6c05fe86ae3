// Reading weight rows in float32, for the CUDA kernels that take a weight in any of the formats
// of anee_fast/ops/weight_formats.py (linear's GEMV and dequantize kernel, skip_kv's projection):
// a decoder per format (Int8Rows, Q8_0Rows, Q4_0Rows, Q4_1Rows; DenseRows for a float tensor of
// another dtype than the activations) with one interface:
//   Rows::Row r = Rows::row(start);   // start: the row's first byte
//   Rows::slice(r, s, K, w);           // w[0..8) = values 8s .. 8s + 7 of the row (0 past K)
// A slice of 8 values is a lane's unit of work: a warp's 32 lanes take 32 consecutive slices (256
// values), so its loads of x and of the weight bytes cover one contiguous run (coalesced), and a
// 32-value GGUF block is read by 4 lanes. Every value is computed in float32 exactly as the
// module's table says, one rounding per operation: d * q one multiply, d * q + m a multiply then
// an add (never an FMA, which rounds once and would differ from `dequantize` in the last bit).
//
// Alignment: a block of q4_0 (18 bytes) or q8_0 (34) starts 2-byte aligned only (its float16 d
// is read as such: the caller guarantees an even row start and row stride), an int8 row (4 + K
// bytes) at any byte. Runs of bytes are therefore read as the aligned 32-bit words that cover them
// and funnel-shifted into place: every such word holds at least one of the wanted bytes, so it lies
// on the same page and in the same allocation granule, and no read can fault.
//
// Everything here but DenseRows and load8_floats is __host__ __device__ and needs only the CUDA
// headers; the device and host code differ only in loads (__ldg), bit casts, the funnel shift and
// the un-fused multiply and add. tests/ops/test_cuda_weight_formats.py compiles it into a host
// program and compares it with weight_formats.dequantize bit for bit.
#pragma once

#include <cuda_fp16.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>

#define ANEE_FAST_HD __host__ __device__ __forceinline__

namespace anee_fast::cuda {

constexpr int kSliceValues = 8;   // values per slice (a lane's unit of work)

namespace weight_detail {

// The aligned 32-bit word at p (little endian, as the bytes are stored).
ANEE_FAST_HD uint32_t load_word(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const unsigned int*>(p));   // read-only path; p lost its space
#else
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

// A float16's bits at a 2-byte aligned p, as float32 (exact: every float16 is a float32).
ANEE_FAST_HD float load_half(const uint8_t* p) {
  uint16_t bits;
#ifdef __CUDA_ARCH__
  bits = __ldg(reinterpret_cast<const unsigned short*>(p));
#else
  std::memcpy(&bits, p, sizeof(bits));
#endif
  return __half2float(__ushort_as_half(bits));
}

ANEE_FAST_HD float bits_to_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// a * b and a + b rounded once each; on the device the intrinsics keep the compiler from
// contracting a multiply and a following add into an FMA.
ANEE_FAST_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ANEE_FAST_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Bits shift .. shift + 31 of the 64-bit hi:lo (shift < 32): a funnel shift (one SHF).
ANEE_FAST_HD uint32_t funnel(uint32_t lo, uint32_t hi, unsigned shift) {
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo, hi, shift);
#else
  return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> shift);
#endif
}

ANEE_FAST_HD const uint8_t* align_down4(const uint8_t* p, unsigned* shift) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  *shift = 8u * static_cast<unsigned>(a & 3u);
  return reinterpret_cast<const uint8_t*>(a & ~uintptr_t{3});
}

// The 4 bytes p[0..4), at any alignment, as one little-endian word: the 1 or 2 aligned words
// covering them.
ANEE_FAST_HD uint32_t load4(const uint8_t* p) {
  unsigned shift;
  const uint8_t* a = align_down4(p, &shift);
  const uint32_t w0 = load_word(a);
  const uint32_t w1 = shift != 0 ? load_word(a + 4) : 0u;
  return funnel(w0, w1, shift);
}

// The 8 bytes p[0..8), at any alignment, as two little-endian words (lo: p[0..4)): the 2 or 3
// aligned words covering them.
ANEE_FAST_HD void load8(const uint8_t* p, uint32_t* lo, uint32_t* hi) {
  unsigned shift;
  const uint8_t* a = align_down4(p, &shift);
  const uint32_t w0 = load_word(a), w1 = load_word(a + 4);
  const uint32_t w2 = shift != 0 ? load_word(a + 8) : 0u;
  *lo = funnel(w0, w1, shift);
  *hi = funnel(w1, w2, shift);
}

constexpr float kMagic = 8388608.f;   // 2^23: a float in [2^23, 2^24) has integer steps

// Byte j of v, an integer u in 0..255, as the float 2^23 + u: its bits are 0x4B000000 | u (one
// byte permute; no int-to-float conversion, which runs at a quarter of the FMA rate).
ANEE_FAST_HD float magic_byte(uint32_t v, int j) {
  return bits_to_float(0x4B000000u | ((v >> (8 * j)) & 0xFFu));
}

// w[0..4) and w[4..8) = scale * q for the 8 int8 q stored in lo, hi (exact q: the bias 128 that
// makes them unsigned is taken back from 2^23 + q + 128, exactly).
ANEE_FAST_HD void scale_int8x8(uint32_t lo, uint32_t hi, float scale, float (&w)[kSliceValues]) {
  lo ^= 0x80808080u;
  hi ^= 0x80808080u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    w[j] = mul_rn(scale, magic_byte(lo, j) - (kMagic + 128.f));
    w[4 + j] = mul_rn(scale, magic_byte(hi, j) - (kMagic + 128.f));
  }
}

// The 8 nibbles of a q4 slice: byte i of a block's 16 holds value i (low nibble) and value
// i + 16 (high nibble), so the quarter `quarter` of the block (values 8 quarter .. + 7) is the
// low (quarter 0, 1) or high (2, 3) nibbles of bytes 8 (quarter % 2) .. + 7. Returns them in
// lo, hi as 4-bit values in bytes (lo: values 8 quarter .. + 3).
ANEE_FAST_HD void load_nibbles(const uint8_t* qs, int quarter, uint32_t* lo, uint32_t* hi) {
  load8(qs + 8 * (quarter & 1), lo, hi);
  const unsigned shift = 4u * static_cast<unsigned>(quarter >> 1);
  *lo = (*lo >> shift) & 0x0F0F0F0Fu;
  *hi = (*hi >> shift) & 0x0F0F0F0Fu;
}

}  // namespace weight_detail

// int8: a float32 scale s (4 bytes, little endian, any alignment), then K int8 q; value s * q.
struct Int8Rows {
  struct Row {
    const uint8_t* q;
    float scale;
  };
  static ANEE_FAST_HD Row row(const uint8_t* start) {
    return {start + 4, weight_detail::bits_to_float(weight_detail::load4(start))};
  }
  static ANEE_FAST_HD void slice(const Row& r, int64_t s, int64_t K, float (&w)[kSliceValues]) {
    const int64_t k0 = s * kSliceValues;
    if (k0 + kSliceValues <= K) {
      uint32_t lo, hi;
      weight_detail::load8(r.q + k0, &lo, &hi);
      weight_detail::scale_int8x8(lo, hi, r.scale, w);
    } else {                                    // the last slice of a K not a multiple of 8
#pragma unroll
      for (int j = 0; j < kSliceValues; ++j) {
        w[j] = k0 + j < K ? weight_detail::mul_rn(r.scale, static_cast<float>(
                                                               static_cast<int8_t>(r.q[k0 + j])))
                          : 0.f;
      }
    }
  }
};

// The GGUF formats: blocks of 32 values; slice s is quarter s % 4 of block s / 4 (K is a
// multiple of 32: no partial slice).
struct BlockRow {
  const uint8_t* start;   // 2-byte aligned
};

// q8_0: 34-byte blocks, float16 d then 32 int8 q; value d * q.
struct Q8_0Rows {
  static constexpr int kBlockBytes = 34;
  using Row = BlockRow;
  static ANEE_FAST_HD Row row(const uint8_t* start) { return {start}; }
  static ANEE_FAST_HD void slice(const Row& r, int64_t s, int64_t /*K*/, float (&w)[kSliceValues]) {
    const uint8_t* block = r.start + (s >> 2) * kBlockBytes;
    const int quarter = static_cast<int>(s & 3);
    uint32_t lo, hi;
    weight_detail::load8(block + 2 + kSliceValues * quarter, &lo, &hi);
    weight_detail::scale_int8x8(lo, hi, weight_detail::load_half(block), w);
  }
};

// q4_0: 18-byte blocks, float16 d then 16 bytes of 4-bit q; value d * (q - 8).
struct Q4_0Rows {
  static constexpr int kBlockBytes = 18;
  using Row = BlockRow;
  static ANEE_FAST_HD Row row(const uint8_t* start) { return {start}; }
  static ANEE_FAST_HD void slice(const Row& r, int64_t s, int64_t /*K*/, float (&w)[kSliceValues]) {
    using namespace weight_detail;
    const uint8_t* block = r.start + (s >> 2) * kBlockBytes;
    const float d = load_half(block);
    uint32_t lo, hi;
    load_nibbles(block + 2, static_cast<int>(s & 3), &lo, &hi);
#pragma unroll
    for (int j = 0; j < 4; ++j) {       // 2^23 + q - (2^23 + 8) = q - 8, exactly
      w[j] = mul_rn(d, magic_byte(lo, j) - (kMagic + 8.f));
      w[4 + j] = mul_rn(d, magic_byte(hi, j) - (kMagic + 8.f));
    }
  }
};

// q4_1: 20-byte blocks, float16 d, float16 m, then 16 bytes of 4-bit q; value d * q + m.
struct Q4_1Rows {
  static constexpr int kBlockBytes = 20;
  using Row = BlockRow;
  static ANEE_FAST_HD Row row(const uint8_t* start) { return {start}; }
  static ANEE_FAST_HD void slice(const Row& r, int64_t s, int64_t /*K*/, float (&w)[kSliceValues]) {
    using namespace weight_detail;
    const uint8_t* block = r.start + (s >> 2) * kBlockBytes;
    const float d = load_half(block), m = load_half(block + 2);
    uint32_t lo, hi;
    load_nibbles(block + 4, static_cast<int>(s & 3), &lo, &hi);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w[j] = add_rn(mul_rn(d, magic_byte(lo, j) - kMagic), m);
      w[4 + j] = add_rn(mul_rn(d, magic_byte(hi, j) - kMagic), m);
    }
  }
};

// v[0..8) = p[0..8) as floats (0 past `valid`, which may be below 8): 16-byte loads where p is
// 16-byte aligned, else one element at a time. scalar_t: float, double, c10::Half or
// c10::BFloat16 (anything static_cast to float). Device only: rows of x and of dense weights.
template <typename scalar_t>
__device__ __forceinline__ void load8_floats(const scalar_t* p, int64_t valid,
                                             float (&v)[kSliceValues]) {
  if (valid >= kSliceValues && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    constexpr int kPerLoad = 16 / sizeof(scalar_t);
#pragma unroll
    for (int i = 0; i < kSliceValues; i += kPerLoad) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + i);
      const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerLoad; ++j) v[i + j] = static_cast<float>(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kSliceValues; ++j) v[j] = j < valid ? static_cast<float>(p[j]) : 0.f;
  }
}

// A float tensor's row (a dense weight whose dtype differs from the activations'): its values
// converted to float32, exactly.
template <typename w_t>
struct DenseRows {
  struct Row {
    const w_t* p;
  };
  static __device__ __forceinline__ Row row(const uint8_t* start) {
    return {reinterpret_cast<const w_t*>(start)};
  }
  static __device__ __forceinline__ void slice(const Row& r, int64_t s, int64_t K,
                                               float (&w)[kSliceValues]) {
    load8_floats(r.p + s * kSliceValues, K - s * kSliceValues, w);
  }
};

}  // namespace anee_fast::cuda

#undef ANEE_FAST_HD
