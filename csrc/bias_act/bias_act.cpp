// fastlayers::bias_act and fastlayers::bias_act_backward: checks, the dense plan and
// the CPU implementation (kernels in bias_act_cpu_kernel.cpp).
#include "bias_act/bias_act.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/torch_utils.h"

namespace fastlayers::bias_act {
namespace {

Activation parse_activation(std::string_view name, const char* op) {
  if (name == "identity") return Activation::kIdentity;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "sigmoid") return Activation::kSigmoid;
  TORCH_CHECK_VALUE(false, op, ": unknown activation '", std::string(name),
                    "'; expected one of identity, relu, gelu, silu, tanh, sigmoid");
  return Activation::kIdentity;
}

DenseShape dense_shape(const at::Tensor& t, at::MemoryFormat format) {
  DenseShape shape;
  if (t.dim() < 2) {  // no channel dimension: one channel, bias-free
    shape.outer = 1;
    shape.channels = 1;
    shape.inner = t.numel();
    return shape;
  }
  shape.channels = t.size(1);
  if (format == at::MemoryFormat::Contiguous) {
    shape.outer = t.size(0);
    shape.inner = shape.channels == 0 || shape.outer == 0 ? 0 : t.numel() / (shape.outer * shape.channels);
  } else {
    shape.outer = shape.channels == 0 ? 0 : t.numel() / shape.channels;
    shape.inner = 1;
  }
  // A plane of one element makes the plane loop degenerate; the row loop is the same
  // computation on the same memory order when inner == 1.
  return shape;
}

struct Plan {
  at::MemoryFormat memory_format = at::MemoryFormat::Contiguous;
  DenseShape shape;
  DType dtype = DType::kFloat32;
  Activation activation = Activation::kIdentity;
};

// Validates input/bias/activation and says how the dense kernels view `input`.
Plan make_plan(const at::Tensor& input, const std::optional<at::Tensor>& bias,
               std::string_view activation, const char* op) {
  Plan plan;
  plan.activation = parse_activation(activation, op);
  plan.dtype = kernel_dtype(input, op, "input");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(input.dim() >= 2, op, ": with a bias, input must have a channel dimension (N, C, ...), got shape ",
                input.sizes());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == input.size(1), op, ": bias must have shape [", input.size(1),
                "] (the size of input dimension 1), got ", b.sizes());
    TORCH_CHECK(b.device() == input.device(), op, ": bias is on ", b.device(), " but input is on ",
                input.device());
    TORCH_CHECK_TYPE(b.scalar_type() == input.scalar_type(), op, ": bias dtype ", b.scalar_type(),
                     " does not match input dtype ", input.scalar_type());
  }
  plan.memory_format = dense_memory_format(input);
  plan.shape = dense_shape(input, plan.memory_format);
  return plan;
}

}  // namespace

ForwardCall prepare_forward(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                            std::string_view activation) {
  Plan plan = make_plan(input, bias, activation, "bias_act");
  ForwardCall call;
  call.input = input.contiguous(plan.memory_format);
  call.output = at::empty(call.input.sizes(), call.input.options().memory_format(plan.memory_format));
  if (bias.has_value()) call.bias = bias->contiguous();
  call.args.input = call.input.const_data_ptr();
  call.args.bias = call.bias.defined() ? call.bias.const_data_ptr() : nullptr;
  call.args.output = call.output.mutable_data_ptr();
  call.args.shape = plan.shape;
  call.args.dtype = plan.dtype;
  call.args.activation = plan.activation;
  return call;
}

BackwardCall prepare_backward(const at::Tensor& grad_output, const at::Tensor& saved,
                              const std::optional<at::Tensor>& bias, std::string_view activation) {
  const char* op = "bias_act_backward";
  Plan plan = make_plan(saved, bias, activation, op);
  TORCH_CHECK(grad_output.sizes() == saved.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
              " but the saved tensor has shape ", saved.sizes());
  TORCH_CHECK(grad_output.device() == saved.device(), op, ": grad_output is on ", grad_output.device(),
              " but the saved tensor is on ", saved.device());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == saved.scalar_type(), op, ": grad_output dtype ",
                   grad_output.scalar_type(), " does not match ", saved.scalar_type());
  BackwardCall call;
  call.saved = saved.contiguous(plan.memory_format);
  call.grad_output = grad_output.contiguous(plan.memory_format);
  call.grad_input = at::empty(call.saved.sizes(), call.saved.options().memory_format(plan.memory_format));
  if (bias.has_value()) call.bias = bias->contiguous();
  call.args.grad_output = call.grad_output.const_data_ptr();
  call.args.saved = call.saved.const_data_ptr();
  call.args.bias = call.bias.defined() ? call.bias.const_data_ptr() : nullptr;
  call.args.grad_input = call.grad_input.mutable_data_ptr();
  call.args.shape = plan.shape;
  call.args.dtype = plan.dtype;
  call.args.activation = plan.activation;
  return call;
}

namespace {

// Rows per partial-sum group for channels_last backward: ~16K elements a group.
int64_t rows_per_group(const DenseShape& shape) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, shape.channels));
}

// Units of work per parallel task: at least ~32K elements.
int64_t grain_units(int64_t elements_per_unit) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, elements_per_unit));
}

at::Tensor bias_act_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                        c10::string_view activation) {
  ForwardCall call = prepare_forward(input, bias, activation);
  const DenseShape& shape = call.args.shape;
  if (shape.numel() == 0) return call.output;
  const CpuKernels& kernels = bias_act_cpu_kernels_select();
  const bool planes = shape.inner > 1;
  const int64_t units = planes ? shape.outer * shape.channels : shape.outer;
  const int64_t per_unit = planes ? shape.inner : shape.channels;
  at::parallel_for(0, units, grain_units(per_unit),
                   [&](int64_t begin, int64_t end) { kernels.forward(call.args, begin, end); });
  return call.output;
}

std::tuple<at::Tensor, at::Tensor> bias_act_backward_cpu(const at::Tensor& grad_output, const at::Tensor& saved,
                                                         const std::optional<at::Tensor>& bias,
                                                         c10::string_view activation) {
  BackwardCall call = prepare_backward(grad_output, saved, bias, activation);
  const DenseShape& shape = call.args.shape;
  const bool planes = shape.inner > 1;
  const int64_t group_rows = rows_per_group(shape);
  const int64_t units = planes ? shape.outer * shape.channels : (shape.outer + group_rows - 1) / group_rows;
  const int64_t groups = planes ? shape.outer : units;
  const bool has_bias = call.bias.defined();

  at::Tensor partials;
  if (has_bias) partials = at::empty({groups, shape.channels}, call.saved.options().dtype(at::kDouble));
  if (shape.numel() > 0) {
    call.args.bias_partials = has_bias ? partials.mutable_data_ptr() : nullptr;
    call.args.rows_per_group = group_rows;
    const CpuKernels& kernels = bias_act_cpu_kernels_select();
    const int64_t per_unit = planes ? shape.inner : group_rows * shape.channels;
    at::parallel_for(0, units, grain_units(per_unit),
                     [&](int64_t begin, int64_t end) { kernels.backward(call.args, begin, end); });
  }
  if (!has_bias) return {call.grad_input, at::empty({0}, call.saved.options())};

  // grad_bias[c] = sum over groups, in group order (deterministic).
  at::Tensor sums = at::zeros({shape.channels}, partials.options());
  if (shape.numel() > 0) {
    const double* p = partials.const_data_ptr<double>();
    double* out = sums.mutable_data_ptr<double>();
    for (int64_t group = 0; group < groups; ++group) {
      for (int64_t c = 0; c < shape.channels; ++c) out[c] += p[group * shape.channels + c];
    }
  }
  return {call.grad_input, sums.to(call.bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_act_backward", &bias_act_backward_cpu);
}

}  // namespace fastlayers::bias_act
