// Per-element math shared by the CPU kernels (compiled per ISA, vectorized by the
// compiler) and the CUDA kernels.
//
// On the device the CUDA math library is used. On the host, float uses the
// branch-free implementations below: glibc's expf/tanhf/erfcf are scalar calls that
// block vectorization of the loops that use them. Measured against float64 over the
// whole float range (tests/test_bias_act.py checks it through the activations): exp <= 1.4 ulp,
// tanh <= 1.5e-7 relative, erfc <= 5e-7 relative for |x| < 2, <= 2e-6 up to x = 6 and
// <= 2e-5 in the far tail (the rounding of x^2 in e^{-x^2}). double exp and tanh are
// branch-free too (<= 2 ulp against torch's float64, tests/test_bias_act.py; the C
// library's calls made the float64 LSTM spend a third of its time in libm); double
// erfc uses the C library.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace fastlayers::math {

#if !defined(__CUDA_ARCH__)
namespace detail {

FL_INLINE float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// 2^n for integer n in [-126, 127] built from the exponent bits.
FL_INLINE float pow2i(int32_t n) { return bits_to_float(static_cast<uint32_t>(n + 127) << 23); }

// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then the Cephes degree-6
// polynomial: e^x = p 2^n. t = x log2(e) + 1.5 * 2^23 rounds to n (round-to-nearest-
// even; unlike std::floor it vectorizes on every ISA, SSE2 has no roundps), and its low
// mantissa bits hold n + 2^22.
constexpr float kRoundMagic = 12582912.0f;
struct ExpParts {
  float p, n, t;
};
FL_INLINE ExpParts exp_parts(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  const float t = x * kLog2e + kRoundMagic;
  const float n = t - kRoundMagic;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return {p, n, t};
}

// e^x for finite x; the scale 2^n is applied in two halves so results in the subnormal
// range and overflow to +inf come out right.
FL_INLINE float exp_finite(float x) {
  x = x > 88.8f ? 88.8f : x;
  x = x < -104.0f ? -104.0f : x;
  const ExpParts e = exp_parts(x);
  int32_t ni = static_cast<int32_t>(e.n);
  int32_t n1 = ni >> 1;
  return e.p * pow2i(n1) * pow2i(ni - n1);
}

FL_INLINE double bits_to_double(uint64_t bits) {
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

FL_INLINE uint64_t double_to_bits(double value) {
  uint64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// 2^n for integer n in [-1022, 1023] built from the exponent bits.
FL_INLINE double pow2i(int64_t n) { return bits_to_double(static_cast<uint64_t>(n + 1023) << 52); }

// As the float version: x = n ln2 + r, |r| <= ln2/2 (fdlibm's ln2 split, whose high
// part has 32 trailing zero bits, so n * kLn2Hi is exact), then e^r by its Taylor
// polynomial to degree 13 (truncation < 0.03 ulp), 1 added last. n is read from the
// bits of the rounding sum rather than converted, which AVX2 and SSE2 cannot do for
// doubles in a vector: the rounding sum's low mantissa bits hold n + 2^51.
constexpr double kRoundMagicDouble = 6755399441055744.0;  // 1.5 * 2^52
struct ExpPartsDouble {
  double p, t;  // e^r, and the rounding sum (as the float version's p and t)
};
FL_INLINE ExpPartsDouble exp_parts(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  const double shifted = x * kLog2e + kRoundMagicDouble;
  const double n = shifted - kRoundMagicDouble;
  double r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  return {1.0 + (r + (r * r) * p), shifted};
}

// n of exp_parts, as an integer (unsigned arithmetic: defined for any bits).
FL_INLINE int64_t exp_exponent(double shifted) {
  return static_cast<int64_t>(double_to_bits(shifted) - double_to_bits(kRoundMagicDouble));
}

// 2^n from exp_parts' rounding sum t, for n in the normal range; from t's bits, not a
// conversion to int (undefined for NaN): unsigned arithmetic, so any bits (NaN's
// garbage exponent included) are defined.
FL_INLINE double pow2_from_rounding(double t) { return pow2i(exp_exponent(t)); }
FL_INLINE float pow2_from_rounding(float t) {
  uint32_t t_bits, magic_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  std::memcpy(&magic_bits, &kRoundMagic, sizeof(magic_bits));
  return bits_to_float((t_bits - magic_bits + 127u) << 23);
}

// e^x for x <= 0 with one scaling: results under the smallest normal number
// (x < flush_below) flush to 0; no overflow or NaN handling (NaN propagates through
// the arithmetic).
template <class T>
FL_INLINE T exp_nonpositive_host(T x, T flush_below) {
  const bool flush = x < flush_below;  // false for NaN, which then stays NaN below
  const auto e = exp_parts(flush ? flush_below : x);
  return flush ? T(0) : e.p * pow2_from_rounding(e.t);
}

// e^x for finite x; 2^n is applied in two halves so that results in the subnormal range
// and overflow to +inf come out right.
FL_INLINE double exp_finite(double x) {
  x = x > 710.0 ? 710.0 : x;
  x = x < -746.0 ? -746.0 : x;
  const ExpPartsDouble e = exp_parts(x);
  const int64_t ni = exp_exponent(e.t);
  const int64_t n1 = ni >> 1;
  return e.p * pow2i(n1) * pow2i(ni - n1);
}

}  // namespace detail
#endif

#if !defined(__CUDA_ARCH__)
namespace detail {
// exp_finite for any x: NaN would make the float->int conversion undefined; compute on 0
// and put it back.
template <class T> FL_INLINE T exp_any(T x) {
  const bool is_nan = x != x;
  const T e = exp_finite(is_nan ? T(0) : x);
  return is_nan ? x : e;
}
}  // namespace detail
#endif

FL_HOST_DEVICE FL_INLINE float exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return detail::exp_any(x);
#endif
}

FL_HOST_DEVICE FL_INLINE double exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return detail::exp_any(x);
#endif
}

// e^x for the shifted logits of a softmax, x <= 0 (x - max, x - logsumexp): exp's
// reduction and polynomial (same accuracy) with one scaling instead of two and no
// overflow or NaN handling, about half of exp's instructions in the attention
// kernels' probability loops. Results up to 1.183e-38 (x < -87.33) flush to 0, as does
// -inf; NaN propagates through the arithmetic. As accurate as exp for 0 < x <= 88 too.
FL_HOST_DEVICE FL_INLINE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return detail::exp_nonpositive_host(x, -87.33f);  // e^-87.33 = 1.183e-38, just above FLT_MIN
#endif
}

// The same for double: results under DBL_MIN (x < -708.39) flush to 0, NaN propagates;
// as accurate as exp for 0 < x <= 709 (the same bits as exp down to the flush). 27%
// less time than exp in the float64 LSTM's pointwise pass (three sigmoids and two tanh
// a unit: 177 -> 128 cycles a vector of 8, measured in a stand-alone copy of the loop).
FL_HOST_DEVICE FL_INLINE double exp_nonpositive(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  // From -708.39 (e^-708.39 = 2.2251e-308, just above DBL_MIN) n >= -1022: 2^n is one
  // normal number.
  return detail::exp_nonpositive_host(x, -708.39);
#endif
}

FL_HOST_DEVICE FL_INLINE float tanh(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  // |x| < 0.625: odd polynomial (Cephes tanhf); beyond, (1 - u) / (1 + u) with
  // u = e^{-2|x|} in (0, 0.29], which goes to 1 as u underflows to 0. Both branches
  // share one division (the LSTM's pointwise pass is bound by its divisions).
  float ax = std::fabs(x);
  float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  float u = exp_nonpositive(-2.0f * ax);  // -2|x| <= 0 (or NaN, which stays NaN)
  bool small = ax < 0.625f;
  float num = small ? p * z * ax + ax : 1.0f - u;
  float den = small ? 1.0f : 1.0f + u;
  // tanh is odd: the sign of x (also of -0.0) goes on at the end.
  return std::copysign(num / den, x);
#endif
}

FL_HOST_DEVICE FL_INLINE double tanh(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  // |x| < 0.625: x + x^3 P(x^2) / Q(x^2) (Cephes tanh); beyond, (1 - u) / (1 + u),
  // u = e^{-2|x|}; one division for both, as the float version.
  double ax = std::fabs(x);
  double z = x * x;
  double p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3;
  double q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3;
  double u = exp_nonpositive(-2.0 * ax);  // -2|x| <= 0 (or NaN, which stays NaN)
  bool small = ax < 0.625;
  double num = small ? ax * q + ax * z * p : 1.0 - u;
  double den = small ? q : 1.0 + u;
  return std::copysign(num / den, x);
#endif
}

FL_HOST_DEVICE FL_INLINE float erfc(float x) {
#if defined(__CUDA_ARCH__)
  return ::erfcf(x);
#else
  // Chebyshev fit of erfc(z) e^{z^2} in t = 1/(1 + z/2) (Numerical Recipes' erfcc,
  // fractional error < 1.2e-7), reflected for x < 0 as erfc(x) = 2 - erfc(-x).
  float z = std::fabs(x);
  float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  float tail = t * exp(p - z * z);
  return x >= 0.0f ? tail : (x != x ? x : 2.0f - tail);
#endif
}

FL_HOST_DEVICE FL_INLINE double erfc(double x) { return ::erfc(x); }

// 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below: e = e^{-|x|} lies in (0, 1], so
// exp_nonpositive's cheaper path serves (no overflow or NaN handling; the LSTM's
// pointwise pass is three sigmoids and two tanh per unit). Results under 1.2e-38 flush
// to 0, as 1 / (1 + e^-x) did from x = -88.7 on; NaN stays NaN, sigmoid(-0.0) = 0.5.
template <class T>
FL_HOST_DEVICE FL_INLINE T sigmoid(T x) {
  const T e = exp_nonpositive(x < T(0) ? x : -x);
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

}  // namespace fastlayers::math
