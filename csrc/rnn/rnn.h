// The recurrent ops (LSTM and Elman RNN; single cells and whole layers) written once
// for every device: argument checks and the step loops; the GEMMs and the fused
// pointwise kernels come from each device's launchers (rnn.cpp for the CPU: an own
// float32 / float64 micro-kernel, else ATen; rnn_cuda.cpp for CUDA: cuBLAS through ATen).
#pragma once

#include <memory>
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "rnn/rnn_kernel.h"

namespace fastlayers::rnn {

// The recurrent GEMM of every step, c (+)= a b, for one b ([k, n], a weight or its
// transpose) over all the steps of one op call. a [m, k] and c [m, n] are row-major
// blocks of the op's buffers (row strides lda, ldc elements, b's dtype and device),
// given as pointers: the step loops address them directly, since a tensor view per
// step and operand (select + narrow, ~0.3 us of dispatch each) cost as much as a
// whole step's pointwise pass at the seed size.
class StepMatmul {
 public:
  virtual ~StepMatmul() = default;
  virtual void run(const void* a, int64_t lda, int64_t m, void* c, int64_t ldc, bool accumulate) = 0;
};

// at::mm_out / addmm_ (cuBLAS, MKL): the general case.
std::unique_ptr<StepMatmul> make_aten_step_matmul(const at::Tensor& b);

// c (+)= a b through ATen; c dense row-major [m, n], a and b any strides.
void aten_matmul_out(at::Tensor c, const at::Tensor& a, const at::Tensor& b, bool accumulate);
// c = a b + bias (bias [n], added to every row) through ATen.
void aten_matmul_bias_out(at::Tensor c, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias);

struct Launchers {
  void (*forward)(const ForwardArgs& args);
  void (*backward)(const BackwardArgs& args);
  // The per-step recurrent GEMM, and the layer's large GEMMs (input projection, input
  // and weight gradients).
  std::unique_ptr<StepMatmul> (*make_step_matmul)(const at::Tensor& b);
  void (*matmul_out)(at::Tensor c, const at::Tensor& a, const at::Tensor& b, bool accumulate);
  // The input projection with the biases: c = a b + bias, bias [n] added to every row.
  void (*matmul_bias_out)(at::Tensor c, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias);
};

Cell parse_nonlinearity(std::string_view nonlinearity, const char* op);

// One layer, one direction, time-major input [T, B, I], or with batch_sizes (a
// PackedSequence's: int64 on the CPU, non-increasing) its packed data [rows, I], each
// step running only the sequences that reach it; hx, cx [B, H]. reverse: the steps run
// from last to first (a packed sequence from its own last step). LSTM: (output [T, B,
// H], cells [T, B, H] = c after each step, gates [T, B, 4H] = the activated gates i, f,
// g, o of each step; packed: [rows, ..]); the backward needs all three. With a
// projection w_hr [P, H] (torch's proj_size), hx and output are P wide, w_hh [4H, P].
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_impl(
    const Launchers& launch, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse);

// (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr); grad_bias
// is the gradient of b_ih and of b_hh alike, shape [0] when has_bias is false;
// grad_w_hr has shape [0] without a projection. Without input_grad, grad_input has
// shape [0], without weight_grad so have the weight and bias gradients (not computed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_impl(const Launchers& launch, const at::Tensor& grad_output, const at::Tensor& grad_cells,
                         const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& cells,
                         const at::Tensor& gates, bool has_bias, const std::optional<at::Tensor>& w_hr,
                         const std::optional<at::Tensor>& batch_sizes, bool reverse, bool input_grad,
                         bool weight_grad);

// Elman RNN layer: output [T, B, H] (packed: [rows, H]).
at::Tensor rnn_layer_impl(const Launchers& launch, const at::Tensor& input, const at::Tensor& hx,
                          const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                          const std::optional<at::Tensor>& b_hh, std::string_view nonlinearity,
                          const std::optional<at::Tensor>& batch_sizes, bool reverse);

// (grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias); input_grad and weight_grad as
// for the LSTM.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_impl(
    const Launchers& launch, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output, bool has_bias,
    std::string_view nonlinearity, const std::optional<at::Tensor>& batch_sizes, bool reverse, bool input_grad,
    bool weight_grad);

// The single-step cells: the layer with T = 1, input [B, I].
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_impl(
    const Launchers& launch, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_impl(
    const Launchers& launch, const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& gates, const at::Tensor& cy, bool has_bias);
at::Tensor rnn_cell_impl(const Launchers& launch, const at::Tensor& input, const at::Tensor& hx,
                         const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh, std::string_view nonlinearity);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_backward_impl(
    const Launchers& launch, const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& hy, bool has_bias,
    std::string_view nonlinearity);

}  // namespace fastlayers::rnn
