// Storage types for the CPU kernel files: loads widen to the compute type (float, or
// double for float64), stores round back (round-to-nearest-even for bfloat16).
#pragma once

#include <cstdint>
#include <cstring>
#if (defined(__AVX512BW__) && defined(__AVX512VL__)) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/dtype.h"
#include "common/macros.h"

namespace fastlayers::cpu {

struct BFloat16 {
  uint16_t bits;
};
using Half = _Float16;

template <class Storage> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };
template <class Storage> using compute_t = typename ComputeType<Storage>::type;

FL_INLINE float load(float v) { return v; }
FL_INLINE double load(double v) { return v; }
FL_INLINE float load(Half v) { return static_cast<float>(v); }
FL_INLINE float load(BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <class Storage> FL_INLINE Storage store(compute_t<Storage> v);
template <> FL_INLINE float store<float>(float v) { return v; }
template <> FL_INLINE double store<double>(double v) { return v; }
template <> FL_INLINE Half store<Half>(float v) { return static_cast<Half>(v); }
template <> FL_INLINE BFloat16 store<BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  // NaN must stay NaN (rounding could carry it into infinity): a quiet NaN, sign kept.
  uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  bool is_nan = v != v;
  return BFloat16{static_cast<uint16_t>(is_nan ? quiet_nan : rounded)};
}

// Calls `fn(Storage{})` with the storage type of `dtype`.
template <class Fn>
FL_INLINE void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat64: fn(double{}); break;
    case DType::kFloat16: fn(Half{}); break;
    case DType::kBFloat16: fn(BFloat16{}); break;
  }
}

// The partial last block of a row for a loop that runs whole vectors: `bytes` (at most
// Block) of src copied into a Block-byte buffer with the rest zeroed, and back out. With
// AVX-512 each is one masked vector load and one whole-vector store (or the reverse),
// so the loop's whole-vector loads of the buffer take their data from the store
// directly. A zeroed buffer filled by memcpy made those loads wait for several small
// stores instead: at H = 50 that stall was a third of the LSTM pointwise passes.
template <int Block>
FL_INLINE void load_partial(void* dst, const void* src, int bytes) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (Block == 64) {
    const __mmask64 mask = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    _mm512_storeu_si512(dst, _mm512_maskz_loadu_epi8(mask, src));
    return;
  } else if constexpr (Block == 32) {
    const __mmask32 mask = bytes >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << bytes) - 1);
    _mm256_storeu_si256(static_cast<__m256i*>(dst), _mm256_maskz_loadu_epi8(mask, src));
    return;
  }
#endif
  std::memset(dst, 0, Block);
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}

template <int Block>
FL_INLINE void store_partial(void* dst, const void* src, int bytes) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (Block == 64) {
    const __mmask64 mask = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    _mm512_mask_storeu_epi8(dst, mask, _mm512_loadu_si512(src));
    return;
  } else if constexpr (Block == 32) {
    const __mmask32 mask = bytes >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << bytes) - 1);
    _mm256_mask_storeu_epi8(dst, mask, _mm256_loadu_si256(static_cast<const __m256i*>(src)));
    return;
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}

// The first `bytes` bytes of a vector register (whole 4- or 8-byte elements, 0 < bytes <=
// sizeof(Vec)): loaded with the rest zero, or stored leaving the rest of dst untouched.
// One masked instruction at AVX-512 and AVX2, straight from the register. A partial
// register tile stored to a stack copy and written back element by element instead
// became masked vector loads of that copy, which the core could not forward the copy's
// store to: conv2d's GEMM tiles with 3 of 16 columns valid ran at 5-10% of the FMA peak.
template <class Vec>
FL_INLINE Vec load_bytes(const void* src, int bytes) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (sizeof(Vec) == 64) {
    const __mmask64 mask = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    return (Vec)_mm512_maskz_loadu_epi8(mask, src);
  }
#endif
#if defined(__AVX2__)
  if constexpr (sizeof(Vec) == 32) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(bytes / 4), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return (Vec)_mm256_maskload_epi32(static_cast<const int*>(src), mask);
  }
#endif
  Vec v{};
  std::memcpy(&v, src, static_cast<size_t>(bytes));
  return v;
}

template <class Vec>
FL_INLINE void store_bytes(void* dst, Vec v, int bytes) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (sizeof(Vec) == 64) {
    const __mmask64 mask = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    _mm512_mask_storeu_epi8(dst, mask, (__m512i)v);
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (sizeof(Vec) == 32) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(bytes / 4), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_epi32(static_cast<int*>(dst), mask, (__m256i)v);
    return;
  }
#endif
  std::memcpy(dst, &v, static_cast<size_t>(bytes));
}

}  // namespace fastlayers::cpu
