// Helpers for the torch-facing op files: argument checks and the bridge to the
// torch-free kernel types.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace fastlayers {

inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float32, float64, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;
}

// The dense memory format we compute in: channels_last(_3d) when `t` is laid out so
// (and not also plain contiguous), else contiguous. The Python fake kernels mirror it.
inline at::MemoryFormat dense_memory_format(const at::Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

}  // namespace fastlayers
