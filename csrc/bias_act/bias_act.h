// Argument checks and dense operands shared by the CPU and CUDA bias_act ops.
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "bias_act/bias_act_kernel.h"

namespace fastlayers::bias_act {

// One forward call, checked (each message names the argument and what was expected)
// and made dense, with the output allocated; `args` points into the tensors held here.
struct ForwardCall {
  at::Tensor input, bias, output;
  ForwardArgs args;
};
ForwardCall prepare_forward(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                            std::string_view activation);

// One backward call, likewise; args.bias_partials and args.rows_per_group are left to
// the device code, whose reduction layouts differ.
struct BackwardCall {
  at::Tensor grad_output, saved, bias, grad_input;
  BackwardArgs args;
};
BackwardCall prepare_backward(const at::Tensor& grad_output, const at::Tensor& saved,
                              const std::optional<at::Tensor>& bias, std::string_view activation);

}  // namespace fastlayers::bias_act
