// CUDA implementation of fastlayers::bias_act / bias_act_backward: checks and
// allocation here, kernels in bias_act_cuda_kernel.cu, launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bias_act/bias_act.h"
#include "common/torch_utils.h"

namespace fastlayers::bias_act {
namespace {

void check_launch(int status, const char* op) {
  auto error = static_cast<cudaError_t>(status);
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

at::Tensor bias_act_cuda(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                         c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(input.device());
  ForwardCall call = prepare_forward(input, bias, activation);
  check_launch(launch_forward_cuda(call.args, at::cuda::getCurrentCUDAStream().stream()), "bias_act");
  return call.output;
}

std::tuple<at::Tensor, at::Tensor> bias_act_backward_cuda(const at::Tensor& grad_output, const at::Tensor& saved,
                                                          const std::optional<at::Tensor>& bias,
                                                          c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(saved.device());
  BackwardCall call = prepare_backward(grad_output, saved, bias, activation);
  const bool has_bias = call.bias.defined();
  at::Tensor grad_bias = has_bias ? at::empty({call.args.shape.channels}, call.bias.options())
                                  : at::empty({0}, call.saved.options());
  at::Tensor partials;
  if (has_bias) {
    const auto acc_dtype = call.saved.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    partials = at::empty({bias_partial_groups_cuda(call.args.shape), call.args.shape.channels},
                         call.saved.options().dtype(acc_dtype));
    call.args.bias_partials = partials.mutable_data_ptr();
  }
  check_launch(launch_backward_cuda(call.args, has_bias ? grad_bias.mutable_data_ptr() : nullptr,
                                    at::cuda::getCurrentCUDAStream().stream()),
               "bias_act_backward");
  return {call.grad_input, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_backward", &bias_act_backward_cuda);
}

}  // namespace fastlayers::bias_act
