// Per-element math of the fused LSTM and Elman RNN cells, shared by the CPU kernels
// (compiled per ISA, vectorized by the compiler) and the CUDA kernels.
//
// LSTM (gate order i, f, g, o as torch):
//   i = sigmoid(z_i), f = sigmoid(z_f), g = tanh(z_g), o = sigmoid(z_o)
//   c' = f c + i g,  h' = o tanh(c')
// with z = x W_ih^T + b_ih + h W_hh^T + b_hh. The backward works from the activated
// gates and c' (tanh(c') is recomputed), never from the pre-activations z.
//
// Elman RNN: h' = act(z), act = tanh or relu; the backward needs only h'.
#pragma once

#include "common/macros.h"
#include "common/math.h"

namespace fastlayers::rnn {

enum class Cell : int { kLstm = 0, kRnnTanh = 1, kRnnRelu = 2 };

// Rows of the gate matrix per hidden unit: 4 for the LSTM, 1 for the Elman RNN.
FL_HOST_DEVICE constexpr int gate_count(Cell cell) { return cell == Cell::kLstm ? 4 : 1; }

template <class T> struct LstmGates {
  T i, f, g, o;
};

template <class T>
FL_HOST_DEVICE FL_INLINE LstmGates<T> lstm_activate(T zi, T zf, T zg, T zo) {
  return {math::sigmoid(zi), math::sigmoid(zf), math::tanh(zg), math::sigmoid(zo)};
}

template <class T> struct LstmGateGrads {
  T i, f, g, o;  // d loss / d z of each gate (pre-activation)
  T c_prev;      // d loss / d c
};

// dh, dc: gradients arriving at h' and c'. c_prev: the cell state the step started from.
template <class T>
FL_HOST_DEVICE FL_INLINE LstmGateGrads<T> lstm_gate_grads(const LstmGates<T>& a, T c_prev, T c_next, T dh, T dc) {
  const T tanh_c = math::tanh(c_next);
  const T dc_total = dc + dh * a.o * (T(1) - tanh_c * tanh_c);
  LstmGateGrads<T> grads;
  grads.i = dc_total * a.g * a.i * (T(1) - a.i);
  grads.f = dc_total * c_prev * a.f * (T(1) - a.f);
  grads.g = dc_total * a.i * (T(1) - a.g * a.g);
  grads.o = dh * tanh_c * a.o * (T(1) - a.o);
  grads.c_prev = dc_total * a.f;
  return grads;
}

template <Cell C, class T>
FL_HOST_DEVICE FL_INLINE T rnn_activate(T z) {
  static_assert(C != Cell::kLstm, "Elman cells only");
  if constexpr (C == Cell::kRnnTanh) {
    return math::tanh(z);
  } else {
    return z < T(0) ? T(0) : z;  // keeps NaN, as torch.relu does
  }
}

// d loss / d z from the output h' = act(z) and the gradient dh arriving at it.
template <Cell C, class T>
FL_HOST_DEVICE FL_INLINE T rnn_grad(T h, T dh) {
  static_assert(C != Cell::kLstm, "Elman cells only");
  if constexpr (C == Cell::kRnnTanh) {
    return dh * (T(1) - h * h);
  } else {
    return h <= T(0) ? T(0) : dh;  // threshold_backward's rule: NaN passes the gradient
  }
}

}  // namespace fastlayers::rnn
