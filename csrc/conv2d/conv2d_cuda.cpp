// CUDA implementation of the fastlayers::conv2d ops: checks (conv2d.h, shared with the
// CPU ops), layout preparation with ATen ops, and the implicit-GEMM kernels of
// conv2d_cuda_kernel.cu launched on the current stream. The passes are the CPU ones
// (see conv2d.cpp): grad-input is a forward over the zero-dilated grad_output with
// the flipped, transposed weight; grad-weight swaps rows and depth.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/torch_utils.h"
#include "conv2d/conv2d.h"

namespace fastlayers::conv2d {
namespace {

void check_launch(int status, const char* op) {
  auto error = static_cast<cudaError_t>(status);
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

// The implicit GEMM's grid is (row tiles, column tiles, groups x depth splits): CUDA
// allows 2^31 - 1 blocks along x and 65535 along y and z.
void check_grid_limits(const char* op, const Geometry& g) {
  TORCH_CHECK(g.groups <= 65535, op, ": the CUDA kernels take up to 65535 groups, got groups=", g.groups);
  const int64_t column_tiles = (std::max(g.out_per_group(), g.in_per_group()) + 63) / 64;
  TORCH_CHECK(column_tiles <= 65535, op, ": the CUDA kernels take up to ", 65535 * 64,
              " channels a group, got ", g.in_per_group(), " in and ", g.out_per_group(), " out");
  const int64_t pixels = std::max(g.batch * g.out_h * g.out_w, g.batch * g.height * g.width);
  const int64_t field = std::max(g.kernel_h * g.kernel_w * g.in_per_group(), g.kernel_h * g.kernel_w * g.out_per_group());
  TORCH_CHECK((std::max(pixels, field) + 63) / 64 <= std::numeric_limits<int32_t>::max(), op,
              ": too many output pixels for one CUDA grid: ", pixels);
}

// [N, C, H, W] -> a zero [N, rows, cols, C] image with element (i, j) at
// (top + i * step_h, left + j * step_w); what falls outside is dropped.
at::Tensor place_nhwc(const at::Tensor& x, int64_t rows, int64_t cols, int64_t top, int64_t left, int64_t step_h,
                      int64_t step_w) {
  at::Tensor nhwc = x.permute({0, 2, 3, 1});
  if (top == 0 && left == 0 && step_h == 1 && step_w == 1 && rows == x.size(2) && cols == x.size(3)) {
    return nhwc.contiguous();
  }
  at::Tensor image = at::zeros({x.size(0), rows, cols, x.size(1)}, x.options());
  auto first_inside = [](int64_t origin, int64_t step) { return origin >= 0 ? 0 : (-origin + step - 1) / step; };
  auto end_inside = [](int64_t origin, int64_t step, int64_t extent, int64_t n) {
    return std::min(n, origin >= extent ? 0 : (extent - 1 - origin) / step + 1);
  };
  const int64_t i0 = first_inside(top, step_h), i1 = end_inside(top, step_h, rows, x.size(2));
  const int64_t j0 = first_inside(left, step_w), j1 = end_inside(left, step_w, cols, x.size(3));
  if (i0 >= i1 || j0 >= j1) return image;
  image.slice(1, top + i0 * step_h, top + (i1 - 1) * step_h + 1, step_h)
      .slice(2, left + j0 * step_w, left + (j1 - 1) * step_w + 1, step_w)
      .copy_(nhwc.slice(1, i0, i1).slice(2, j0, j1));
  return image;
}

CudaGemmArgs image_args(const at::Tensor& image, const Geometry& g, int64_t out_h, int64_t out_w,
                        int64_t depth_channels) {
  CudaGemmArgs a;
  a.dtype = kernel_dtype(image, "conv2d", "input");
  a.image = image.const_data_ptr();
  a.image_rows = image.size(1);
  a.image_cols = image.size(2);
  a.image_channels = image.size(3);
  a.batch = image.size(0);
  a.out_h = out_h;
  a.out_w = out_w;
  a.stride_h = g.stride_h;
  a.stride_w = g.stride_w;
  a.dilation_h = g.dilation_h;
  a.dilation_w = g.dilation_w;
  a.kernel_h = g.kernel_h;
  a.kernel_w = g.kernel_w;
  a.depth_channels = depth_channels;
  a.groups = g.groups;
  return a;
}

// Weight [C_out, C_in/G, kh, kw] -> [G, kh * kw * C_in/G, C_out/G].
at::Tensor pack_weight(const at::Tensor& weight, const Geometry& g) {
  return weight.reshape({g.groups, g.out_per_group(), g.in_per_group(), g.kernel_h, g.kernel_w})
      .permute({0, 3, 4, 2, 1})
      .contiguous();
}

at::Tensor nhwc_to_output(const at::Tensor& nhwc, bool channels_last) {
  at::Tensor nchw = nhwc.permute({0, 3, 1, 2});
  return channels_last ? nchw : nchw.contiguous();
}

at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       bool relu) {
  const Geometry g = check_forward("conv2d", input, weight, bias, stride, padding, dilation, groups);
  check_grid_limits("conv2d", g);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor image = place_nhwc(input, g.height + 2 * g.pad_h, g.width + 2 * g.pad_w, g.pad_h, g.pad_w, 1, 1);
  at::Tensor packed = pack_weight(weight, g);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.batch, g.out_h, g.out_w, g.out_channels}, input.options());
  CudaGemmArgs a = image_args(image, g, g.out_h, g.out_w, g.in_per_group());
  a.mode = CudaGemmMode::kForward;
  a.b = packed.const_data_ptr();
  a.ldb = g.out_per_group();
  a.b_group_stride = packed.size(1) * a.ldb;
  a.c = out.mutable_data_ptr();
  a.ldc = g.out_channels;
  a.c_group_stride = g.out_per_group();
  a.columns = g.out_per_group();
  a.bias = b.defined() ? b.const_data_ptr() : nullptr;
  a.relu = relu;
  check_launch(launch_offset_gemm_cuda(a, at::cuda::getCurrentCUDAStream().stream()), "conv2d");
  return nhwc_to_output(out, wants_channels_last(input, weight));
}

at::Tensor conv2d_backward_input_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                                      at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_input";
  const Geometry g = check_backward_input(grad_output, weight, input_size, stride, padding, dilation, groups);
  check_grid_limits(op, g);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor image = place_nhwc(grad_output, g.height + g.dilation_h * (g.kernel_h - 1),
                                g.width + g.dilation_w * (g.kernel_w - 1), g.dilation_h * (g.kernel_h - 1) - g.pad_h,
                                g.dilation_w * (g.kernel_w - 1) - g.pad_w, g.stride_h, g.stride_w);
  // B[g][(kh', kw', co)][ci] = weight[g, co, ci, k_h - 1 - kh', k_w - 1 - kw']
  at::Tensor packed = weight.reshape({g.groups, g.out_per_group(), g.in_per_group(), g.kernel_h, g.kernel_w})
                          .flip({3, 4})
                          .permute({0, 3, 4, 1, 2})
                          .contiguous();
  at::Tensor out = at::empty({g.batch, g.height, g.width, g.in_channels}, grad_output.options());
  Geometry unit = g;  // the grad-input pass has stride 1
  unit.stride_h = unit.stride_w = 1;
  CudaGemmArgs a = image_args(image, unit, g.height, g.width, g.out_per_group());
  a.mode = CudaGemmMode::kForward;
  a.b = packed.const_data_ptr();
  a.ldb = g.in_per_group();
  a.b_group_stride = g.kernel_h * g.kernel_w * g.out_per_group() * a.ldb;
  a.c = out.mutable_data_ptr();
  a.ldc = g.in_channels;
  a.c_group_stride = g.in_per_group();
  a.columns = g.in_per_group();
  check_launch(launch_offset_gemm_cuda(a, at::cuda::getCurrentCUDAStream().stream()), op);
  // The pass multiplies taps landing outside grad_output (padding, and with stride > 1
  // the zeros between its pixels) by zeros: exact unless a weight is NaN or infinite.
  // The edge pixels are then recomputed with those taps skipped, as torch does; with
  // stride > 1 in a dimension every row (column) reads gaps, so all of them are edges.
  // The flag stays on the device (no host synchronization).
  EdgeGradInputCudaArgs edges;
  edges.geometry = edge_geometry(g);
  if (g.stride_h > 1) {
    edges.geometry.top = g.height;
    edges.geometry.bottom = 0;
  }
  if (g.stride_w > 1) {
    edges.geometry.left = g.width;
    edges.geometry.right = 0;
  }
  if (edges.geometry.pixels() > 0 && g.batch > 0) {
    const at::Tensor weight_finite = at::isfinite(weight).all();
    const at::Tensor w = weight.contiguous();
    edges.batch = g.batch;
    edges.grad_output = grad_output.const_data_ptr();
    for (int d = 0; d < 4; ++d) edges.grad_output_strides[d] = grad_output.stride(d);
    edges.weight = w.const_data_ptr();
    edges.weight_finite = weight_finite.const_data_ptr<bool>();
    edges.grad_input = out.mutable_data_ptr();
    edges.dtype = a.dtype;
    check_launch(launch_edge_grad_input_cuda(edges, at::cuda::getCurrentCUDAStream().stream()), op);
  }
  return nhwc_to_output(out, grad_output.suggest_memory_format() == at::MemoryFormat::ChannelsLast);
}

at::Tensor conv2d_backward_weight_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                       at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_backward_weight";
  const Geometry g = check_backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups);
  check_grid_limits(op, g);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor image = place_nhwc(input, g.height + 2 * g.pad_h, g.width + 2 * g.pad_w, g.pad_h, g.pad_w, 1, 1);
  at::Tensor go = grad_output.permute({0, 2, 3, 1}).contiguous();  // [pixels][C_out]
  const int64_t field = g.kernel_h * g.kernel_w * g.in_per_group();
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor acc = at::zeros({g.groups, field, g.out_per_group()}, input.options().dtype(acc_dtype));
  CudaGemmArgs a = image_args(image, g, g.out_h, g.out_w, g.in_per_group());
  a.mode = CudaGemmMode::kWeightGrad;
  a.b = go.const_data_ptr();
  a.ldb = g.out_channels;
  a.b_group_stride = g.out_per_group();
  a.c = acc.mutable_data_ptr();
  a.ldc = g.out_per_group();
  a.c_group_stride = field * g.out_per_group();
  a.columns = g.out_per_group();
  // Under torch.use_deterministic_algorithms(True): no depth split, so every element of
  // acc gets exactly one atomicAdd (onto 0) and the result is the same on every run.
  a.single_split = at::globalContext().deterministicAlgorithms();
  check_launch(launch_offset_gemm_cuda(a, at::cuda::getCurrentCUDAStream().stream()), op);
  // [G, kh, kw, ci, co] -> [G, co, ci, kh, kw]
  return acc.reshape({g.groups, g.kernel_h, g.kernel_w, g.in_per_group(), g.out_per_group()})
      .permute({0, 4, 3, 1, 2})
      .reshape(weight_size)
      .contiguous()
      .to(input.scalar_type());
}

at::Tensor conv2d_backward_bias_cuda(const at::Tensor& grad_output) {
  const char* op = "conv2d_backward_bias";
  kernel_dtype(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.dim() == 4, op, ": expected a 4-D grad_output, got shape ", grad_output.sizes());
  const auto acc_dtype = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return grad_output.sum({0, 2, 3}, false, acc_dtype).to(grad_output.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                                               at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_relu_max_pool2d";
  const Geometry g = check_forward(op, input, weight, bias, stride, padding, dilation, groups);
  TORCH_CHECK(g.out_h >= 2 && g.out_w >= 2, op, ": the convolution output (", g.out_h, " x ", g.out_w,
              ") is smaller than the 2x2 pooling window");
  check_grid_limits(op, g);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor image = place_nhwc(input, g.height + 2 * g.pad_h, g.width + 2 * g.pad_w, g.pad_h, g.pad_w, 1, 1);
  at::Tensor packed = pack_weight(weight, g);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor pooled = at::empty({g.batch, g.out_h / 2, g.out_w / 2, g.out_channels}, input.options());
  at::Tensor argmax = at::empty(pooled.sizes(), input.options().dtype(at::kByte));
  CudaGemmArgs a = image_args(image, g, g.out_h, g.out_w, g.in_per_group());
  a.mode = CudaGemmMode::kWindows;
  a.b = packed.const_data_ptr();
  a.ldb = g.out_per_group();
  a.b_group_stride = packed.size(1) * a.ldb;
  a.columns = g.out_per_group();
  a.bias = b.defined() ? b.const_data_ptr() : nullptr;
  a.relu = true;
  a.pooled = pooled.mutable_data_ptr();
  a.argmax = argmax.mutable_data_ptr<uint8_t>();
  check_launch(launch_offset_gemm_cuda(a, at::cuda::getCurrentCUDAStream().stream()), op);
  const bool channels_last = wants_channels_last(input, weight);
  return {nhwc_to_output(pooled, channels_last), nhwc_to_output(argmax, channels_last)};
}

at::Tensor conv2d_relu_max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& output,
                                                const at::Tensor& argmax, at::IntArrayRef conv_size) {
  const char* op = "conv2d_relu_max_pool2d_backward";
  kernel_dtype(output, op, "output");
  check_same(op, output, "grad_output", grad_output);
  TORCH_CHECK(conv_size.size() == 4, op, ": conv_size must have 4 elements, got ", conv_size);
  TORCH_CHECK(output.dim() == 4 && output.size(0) == conv_size[0] && output.size(1) == conv_size[1] &&
                  output.size(2) == conv_size[2] / 2 && output.size(3) == conv_size[3] / 2,
              op, ": output of shape ", output.sizes(), " is not the 2x2 pooling of ", conv_size);
  TORCH_CHECK(grad_output.sizes() == output.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
              " but output has shape ", output.sizes());
  TORCH_CHECK(argmax.sizes() == output.sizes() && argmax.scalar_type() == at::kByte, op,
              ": argmax must be uint8 of shape ", output.sizes(), ", got ", argmax.scalar_type(), " ",
              argmax.sizes());
  const c10::cuda::CUDAGuard guard(output.device());
  // threshold_backward's rule: the gradient passes unless the output is <= 0.
  at::Tensor masked = at::where(output.le(0), at::zeros_like(grad_output), grad_output);
  // A gather, not max_unpool2d's scatter (which torch flags as nondeterministic): pixel
  // (dy, dx) of window (ph, pw), i.e. conv pixel (2 ph + dy, 2 pw + dx), takes the
  // window's gradient when argmax == 2 dy + dx. Viewed [N, C, ph, dy, pw, dx].
  const int64_t pooled_h = output.size(2), pooled_w = output.size(3);
  at::Tensor position = at::arange(4, argmax.options()).view({1, 1, 1, 2, 1, 2});
  at::Tensor hit = argmax.unsqueeze(3).unsqueeze(5).eq(position);
  at::Tensor windows = at::where(hit, masked.unsqueeze(3).unsqueeze(5), 0.0);
  // Conv pixels outside every window (odd last row / column) get 0.
  at::Tensor grad_conv = at::zeros({conv_size[0], conv_size[1], conv_size[2], conv_size[3]},
                                   grad_output.options().memory_format(at::MemoryFormat::ChannelsLast));
  grad_conv.narrow(2, 0, 2 * pooled_h)
      .narrow(3, 0, 2 * pooled_w)
      .copy_(windows.reshape({conv_size[0], conv_size[1], 2 * pooled_h, 2 * pooled_w}));
  return grad_conv;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("conv2d", &conv2d_cuda);
  m.impl("conv2d_backward_input", &conv2d_backward_input_cuda);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cuda);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias_cuda);
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_cuda);
  m.impl("conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_cuda);
}

}  // namespace fastlayers::conv2d
