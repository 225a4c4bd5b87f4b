// The attention dropout mask, shared by the CPU and CUDA kernels (and written again in
// torch ops by python/fastlayers/ops/attention.py: dropout_factors_reference).
//
// The mask is never stored: keep(bh, i, j) is a pure function of a (seed, offset) pair
// drawn once per forward from torch's generator, so the backward regenerates it.
// Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
// keyed by the seed, with the counter (j / 4, i, bh, offset): one call gives the four
// 32-bit words of keys 4*(j/4) .. 4*(j/4)+3 of query row i of (batch * heads) slice bh.
// Key j is kept iff its word is >= threshold = round(p * 2^32), a keep rate of 1 - p
// (to within 2^-32); kept probabilities are scaled by 1 / (1 - p).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace fastlayers::attention {

struct DropoutParams {
  uint64_t seed = 0;
  uint32_t offset = 0;
  uint64_t threshold = 0;  // words >= threshold are kept; 2^32 drops everything
  double keep_scale = 1.0; // 1 / (1 - p), 0 when p == 1
  bool enabled = false;
};

struct Philox4 {
  uint32_t x[4];
};

FL_HOST_DEVICE FL_INLINE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Philox 4x32 with 10 rounds: Random123's philox4x32_R(10, ...).
FL_HOST_DEVICE FL_INLINE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                               uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  // Fully unrolled: the CPU kernels vectorize their loops over counters only without
  // control flow inside.
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(kMul0, c0, hi0, lo0);
    mul_hi_lo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c1 = lo1;
    c3 = lo0;
    c0 = n0;
    c2 = n2;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

// The four words for keys 4*quad .. 4*quad+3 of row i of slice bh.
FL_HOST_DEVICE FL_INLINE Philox4 dropout_words(const DropoutParams& d, int64_t bh, int64_t i, int64_t quad) {
  return philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(i), static_cast<uint32_t>(bh), d.offset,
                       static_cast<uint32_t>(d.seed), static_cast<uint32_t>(d.seed >> 32));
}

FL_HOST_DEVICE FL_INLINE bool dropout_keeps(const DropoutParams& d, uint32_t word) {
  return static_cast<uint64_t>(word) >= d.threshold;
}

}  // namespace fastlayers::attention
