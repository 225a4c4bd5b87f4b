// Argument checks and geometry shared by the CPU (conv2d.cpp) and CUDA
// (conv2d_cuda.cpp) conv2d ops.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "conv2d/conv2d_kernel.h"

namespace fastlayers::conv2d {

struct Geometry {
  int64_t batch = 0, in_channels = 0, height = 0, width = 0;
  int64_t out_channels = 0, kernel_h = 0, kernel_w = 0;
  int64_t out_h = 0, out_w = 0;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1;
  int64_t groups = 1;
  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
};

// The shapes of an input and a weight (sizes only), checked as torch checks them
// (RuntimeError naming the argument, its shape and what was expected).
Geometry make_geometry(const char* op, at::IntArrayRef input_size, at::IntArrayRef weight_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// `other` is on input's device and has its dtype.
void check_same(const char* op, const at::Tensor& input, const char* arg, const at::Tensor& other);

// Every check of conv2d_backward_input (grad_output's dtype, weight's device and dtype,
// the geometry, grad_output's shape) and of conv2d_backward_weight (input's dtype,
// grad_output's device and dtype, the geometry, grad_output's shape).
Geometry check_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups);
Geometry check_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups);

// Every check of a forward op: dtypes, devices, shapes, parameters, the bias.
Geometry check_forward(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups);

// The edge pixels of a grad_input (see EdgeGeometry in conv2d_kernel.h): the rows and
// columns, counted from each side, that have a tap landing outside grad_output.
EdgeGeometry edge_geometry(const Geometry& g);

// torch's rule for a convolution's output layout: channels_last when the input or
// the weight is.
bool wants_channels_last(const at::Tensor& input, const at::Tensor& weight);

}  // namespace fastlayers::conv2d
