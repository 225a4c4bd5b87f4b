// Argument checks and the dense plan shared by the CPU and CUDA bias_act ops.
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "bias_act/bias_act_kernel.h"

namespace fastlayers::bias_act {

Activation parse_activation(std::string_view name, const char* op);

struct Plan {
  at::MemoryFormat memory_format = at::MemoryFormat::Contiguous;
  DenseShape shape;
  DType dtype = DType::kFloat32;
  Activation activation = Activation::kIdentity;
};

// Validates input/bias/activation (naming the argument and what was expected) and
// returns how the dense kernels view `input`.
Plan make_plan(const at::Tensor& input, const std::optional<at::Tensor>& bias,
               std::string_view activation, const char* op);

// Checks grad_output and saved against each other and the plan of `saved`.
Plan make_backward_plan(const at::Tensor& grad_output, const at::Tensor& saved,
                        const std::optional<at::Tensor>& bias, std::string_view activation);

// Rows per partial-sum group for channels_last backward: ~16K elements a group.
inline int64_t rows_per_group(const DenseShape& shape) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, shape.channels));
}

}  // namespace fastlayers::bias_act
