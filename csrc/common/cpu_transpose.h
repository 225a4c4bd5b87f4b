// Blocked 2-D transposes for the per-ISA CPU kernels (conv2d's NCHW <-> NHWC layout
// passes, the LSTM/RNN GEMMs' transposed operands and results). Included by kernel files
// compiled once per ISA: everything lands in that ISA's namespace fastlayers::FL_CPU_NS.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#if defined(FL_CPU_ISA_avx512)
#include <immintrin.h>
#endif

#include "common/macros.h"

namespace fastlayers::FL_CPU_NS {

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols, rows and cols <= 16
// (float, AVX-512): masked loads of the rows, four shuffle stages, masked stores, so a
// partial block (a row's last columns, a chunk of fewer channels) needs no scalar loop.
#if defined(FL_CPU_ISA_avx512)
constexpr bool kHasTranspose16 = true;
FL_INLINE void transpose16(const float* src, int64_t lds, int rows, int cols, float* dst, int64_t ldd) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, src + i * lds) : _mm512_setzero_ps();
  // 32-bit interleave of row pairs, then 64-bit, then 128-bit lanes twice.
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
  for (int j = 0; j < cols; ++j) _mm512_mask_storeu_ps(dst + j * ldd, row_mask, r[j]);
}
#else
constexpr bool kHasTranspose16 = false;
FL_INLINE void transpose16(const float*, int64_t, int, int, float*, int64_t) {}
#endif

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols: in 16 x 16 blocks through
// transpose16 where it exists (float), else in 16 x 16 blocks element by element.
template <class T>
inline void transpose_block(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  if constexpr (std::is_same_v<T, float>) {
    if (kHasTranspose16) {
      // Destination rows outermost: 16 of them are written at a time, each continuing
      // where the last block ended. Source rows outermost, an NHWC block stored into
      // NCHW planes 4 KB apart kept one write stream open per channel (128 at C = 128):
      // the transposes were 13% of the 3x3 forward's samples at B32 C64->128 32x32
      // (13.1 ms), 8% this way (12.5 ms); the input's NCHW -> NHWC rows (64 channel
      // rows, 32 wide) ran the same either way.
      for (int64_t j0 = 0; j0 < cols; j0 += 16) {
        const int nc = static_cast<int>(std::min<int64_t>(16, cols - j0));
        for (int64_t i0 = 0; i0 < rows; i0 += 16) {
          transpose16(src + i0 * lds + j0, lds, static_cast<int>(std::min<int64_t>(16, rows - i0)), nc,
                      dst + j0 * ldd + i0, ldd);
        }
      }
      return;
    }
  }
  // 16 x 16 blocks element by element: a block's source lines stay in L1 while its
  // destination rows are written.
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    const int64_t j1 = std::min(cols, j0 + 16);
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
      const int64_t i1 = std::min(rows, i0 + 16);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ldd + i] = src[i * lds + j];
      }
    }
  }
}

}  // namespace fastlayers::FL_CPU_NS
