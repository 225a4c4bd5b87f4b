// Storage types for the CPU kernel files: loads widen to the compute type (float, or
// double for float64), stores round back (round-to-nearest-even for bfloat16).
#pragma once

#include <cstdint>
#include <cstring>

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

}  // namespace fastlayers::cpu
