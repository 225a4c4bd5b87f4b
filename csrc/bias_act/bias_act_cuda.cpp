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
  Plan plan = make_plan(input, bias, activation, "bias_act");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor x = input.contiguous(plan.memory_format);
  at::Tensor output = at::empty(x.sizes(), x.options().memory_format(plan.memory_format));
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  ForwardArgs args;
  args.input = x.const_data_ptr();
  args.bias = b.defined() ? b.const_data_ptr() : nullptr;
  args.output = output.mutable_data_ptr();
  args.shape = plan.shape;
  args.dtype = plan.dtype;
  args.activation = plan.activation;
  check_launch(launch_forward_cuda(args, at::cuda::getCurrentCUDAStream().stream()), "bias_act");
  return output;
}

std::tuple<at::Tensor, at::Tensor> bias_act_backward_cuda(const at::Tensor& grad_output, const at::Tensor& saved,
                                                          const std::optional<at::Tensor>& bias,
                                                          c10::string_view activation) {
  Plan plan = make_backward_plan(grad_output, saved, bias, activation);
  const c10::cuda::CUDAGuard guard(saved.device());
  at::Tensor s = saved.contiguous(plan.memory_format);
  at::Tensor g = grad_output.contiguous(plan.memory_format);
  at::Tensor grad_input = at::empty(s.sizes(), s.options().memory_format(plan.memory_format));
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor grad_bias = b.defined() ? at::empty({plan.shape.channels}, b.options()) : at::empty({0}, s.options());
  at::Tensor partials;
  if (b.defined()) {
    const auto acc_dtype = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    partials = at::empty({bias_partial_groups_cuda(plan.shape), plan.shape.channels}, s.options().dtype(acc_dtype));
  }
  BackwardArgs args;
  args.grad_output = g.const_data_ptr();
  args.saved = s.const_data_ptr();
  args.bias = b.defined() ? b.const_data_ptr() : nullptr;
  args.grad_input = grad_input.mutable_data_ptr();
  args.bias_partials = b.defined() ? partials.mutable_data_ptr() : nullptr;
  args.shape = plan.shape;
  args.dtype = plan.dtype;
  args.activation = plan.activation;
  check_launch(launch_backward_cuda(args, b.defined() ? grad_bias.mutable_data_ptr() : nullptr,
                                    at::cuda::getCurrentCUDAStream().stream()),
               "bias_act_backward");
  return {grad_input, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_backward", &bias_act_backward_cuda);
}

}  // namespace fastlayers::bias_act
