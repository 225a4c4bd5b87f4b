// CUDA registrations of the LSTM / Elman RNN ops: the device-independent step loops of
// rnn.cpp (GEMMs through ATen, i.e. cuBLAS) with the pointwise kernels of
// rnn_cuda_kernel.cu, launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rnn/rnn.h"

namespace fastlayers::rnn {
namespace {

void check_launch(int status, const char* op) {
  auto error = static_cast<cudaError_t>(status);
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

void forward_cuda(const ForwardArgs& args) {
  check_launch(launch_forward_cuda(args, at::cuda::getCurrentCUDAStream().stream()), "rnn pointwise forward");
}

void backward_cuda(const BackwardArgs& args) {
  check_launch(launch_backward_cuda(args, at::cuda::getCurrentCUDAStream().stream()), "rnn pointwise backward");
}

constexpr Launchers kCudaLaunchers{&forward_cuda, &backward_cuda, &make_aten_step_matmul, &aten_matmul_out,
                                   &aten_matmul_bias_out};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cuda(const at::Tensor& input, const at::Tensor& hx,
                                                              const at::Tensor& cx, const at::Tensor& w_ih,
                                                              const at::Tensor& w_hh,
                                                              const std::optional<at::Tensor>& b_ih,
                                                              const std::optional<at::Tensor>& b_hh) {
  const c10::cuda::CUDAGuard guard(input.device());
  return lstm_cell_impl(kCudaLaunchers, input, hx, cx, w_ih, w_hh, b_ih, b_hh);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_cuda(
    const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& gates,
    const at::Tensor& cy, bool has_bias) {
  const c10::cuda::CUDAGuard guard(input.device());
  return lstm_cell_backward_impl(kCudaLaunchers, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, gates, cy, has_bias);
}

at::Tensor rnn_cell_cuda(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity) {
  const c10::cuda::CUDAGuard guard(input.device());
  return rnn_cell_impl(kCudaLaunchers, input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_backward_cuda(
    const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& hy, bool has_bias, c10::string_view nonlinearity) {
  const c10::cuda::CUDAGuard guard(input.device());
  return rnn_cell_backward_impl(kCudaLaunchers, grad_hy, input, hx, w_ih, w_hh, hy, has_bias, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const c10::cuda::CUDAGuard guard(input.device());
  return lstm_layer_impl(kCudaLaunchers, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_cells, const at::Tensor& input,
                         const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const at::Tensor& output, const at::Tensor& cells, const at::Tensor& gates, bool has_bias,
                         const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
                         bool reverse, bool input_grad, bool weight_grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  return lstm_layer_backward_impl(kCudaLaunchers, grad_output, grad_cells, input, hx, cx, w_ih, w_hh, output, cells,
                                  gates, has_bias, w_hr, batch_sizes, reverse, input_grad, weight_grad);
}

at::Tensor rnn_layer_cuda(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                          const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                          const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity,
                         const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const c10::cuda::CUDAGuard guard(input.device());
  return rnn_layer_impl(kCudaLaunchers, input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& output, bool has_bias, c10::string_view nonlinearity,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool input_grad, bool weight_grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  return rnn_layer_backward_impl(kCudaLaunchers, grad_output, input, hx, w_ih, w_hh, output, has_bias, nonlinearity,
                                 batch_sizes, reverse, input_grad, weight_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("lstm_cell", &lstm_cell_cuda);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cuda);
  m.impl("rnn_cell", &rnn_cell_cuda);
  m.impl("rnn_cell_backward", &rnn_cell_backward_cuda);
  m.impl("lstm_layer", &lstm_layer_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
  m.impl("rnn_layer", &rnn_layer_cuda);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cuda);
}

}  // namespace fastlayers::rnn
