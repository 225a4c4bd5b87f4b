// The recurrent ops (LSTM and Elman RNN; single cells and whole layers) written once
// for every device: argument checks, the GEMMs through ATen (at::mm / addmm_: MKL or
// oneDNN on the CPU, cuBLAS on CUDA) and the fused pointwise kernels, which each
// device passes in as launchers (rnn.cpp for the CPU, rnn_cuda.cpp for CUDA).
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "rnn/rnn_kernel.h"

namespace fastlayers::rnn {

struct Launchers {
  void (*forward)(const ForwardArgs& args);
  void (*backward)(const BackwardArgs& args);
};

Cell parse_nonlinearity(std::string_view nonlinearity, const char* op);

// One layer, one direction, time-major input [T, B, I]; hx, cx [B, H].
// LSTM: (output [T, B, H], cells [T, B, H] = c after each step, gates [T, B, 4H] =
// the activated gates i, f, g, o of each step); the backward needs all three.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_impl(
    const Launchers& launch, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh);

// (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias); grad_bias is the
// gradient of b_ih and of b_hh alike, shape [0] when has_bias is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward_impl(
    const Launchers& launch, const at::Tensor& grad_output, const at::Tensor& grad_cells, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& output, const at::Tensor& cells, const at::Tensor& gates, bool has_bias);

// Elman RNN layer: output [T, B, H].
at::Tensor rnn_layer_impl(const Launchers& launch, const at::Tensor& input, const at::Tensor& hx,
                          const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                          const std::optional<at::Tensor>& b_hh, std::string_view nonlinearity);

// (grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_impl(
    const Launchers& launch, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output, bool has_bias,
    std::string_view nonlinearity);

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
