// Fused LSTM / Elman RNN pointwise kernels for the CPU. Compiled once per ISA into
// namespace fastlayers::FL_CPU_NS (see csrc/cmake/FastlayersCpuKernels.cmake); the
// loops over the hidden units of one batch row are plain C++ the compiler vectorizes
// at the ISA's width (`omp simd`), the math in rnn_math.h. Parallelism over batch
// rows lives in the caller (at::parallel_for).
#include "common/cpu_scalar.h"
#include "rnn/rnn_kernel.h"

namespace fastlayers::FL_CPU_NS {
namespace {

using cpu::compute_t;
using cpu::load;
using cpu::store;
using rnn::BackwardArgs;
using rnn::Cell;
using rnn::ForwardArgs;

// Added where there is no bias: z + (-0.0) == z for every z, -0.0 included.
template <class T> constexpr T kNoBias = T(-0.0);

template <class S>
FL_INLINE compute_t<S> bias_at(const S* bias, int64_t j) {
  return bias ? compute_t<S>(load(bias[j])) : kNoBias<compute_t<S>>;
}

template <class S>
void lstm_forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const int64_t hidden = args.hidden;
  const S* b_ih = static_cast<const S*>(args.bias_ih);
  const S* b_hh = static_cast<const S*>(args.bias_hh);
  for (int64_t row = begin; row < end; ++row) {
    S* z = static_cast<S*>(args.gates) + row * 4 * hidden;
    const S* c_prev = static_cast<const S*>(args.cx) + row * hidden;
    S* h_next = static_cast<S*>(args.hy) + row * hidden;
    S* c_next = static_cast<S*>(args.cy) + row * hidden;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const int64_t ji = j, jf = hidden + j, jg = 2 * hidden + j, jo = 3 * hidden + j;
      const rnn::LstmGates<T> a = rnn::lstm_activate<T>(
          T(load(z[ji])) + bias_at(b_ih, ji) + bias_at(b_hh, ji), T(load(z[jf])) + bias_at(b_ih, jf) + bias_at(b_hh, jf),
          T(load(z[jg])) + bias_at(b_ih, jg) + bias_at(b_hh, jg), T(load(z[jo])) + bias_at(b_ih, jo) + bias_at(b_hh, jo));
      const T c = a.f * T(load(c_prev[j])) + a.i * a.g;
      z[ji] = store<S>(a.i);
      z[jf] = store<S>(a.f);
      z[jg] = store<S>(a.g);
      z[jo] = store<S>(a.o);
      c_next[j] = store<S>(c);
      h_next[j] = store<S>(a.o * math::tanh(c));
    }
  }
}

template <Cell C, class S>
void rnn_forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const int64_t hidden = args.hidden;
  const S* b_ih = static_cast<const S*>(args.bias_ih);
  const S* b_hh = static_cast<const S*>(args.bias_hh);
  for (int64_t row = begin; row < end; ++row) {
    const S* z = static_cast<const S*>(args.gates) + row * hidden;
    S* h_next = static_cast<S*>(args.hy) + row * hidden;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      h_next[j] = store<S>(rnn::rnn_activate<C, T>(T(load(z[j])) + bias_at(b_ih, j) + bias_at(b_hh, j)));
    }
  }
}

// Loads element j of an optional addend (null: zero).
template <class S>
FL_INLINE compute_t<S> optional_at(const S* p, int64_t j) {
  return p ? compute_t<S>(load(p[j])) : compute_t<S>(0);
}

template <class S>
void lstm_backward(const BackwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const int64_t hidden = args.hidden;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t offset = row * hidden;
    const S* gates = static_cast<const S*>(args.gates) + 4 * offset;
    const S* c_prev = static_cast<const S*>(args.cx) + offset;
    const S* c_next = static_cast<const S*>(args.cy) + offset;
    const S* dh = static_cast<const S*>(args.grad_hy) + offset;
    const S* dh_rec = args.grad_hy_recurrent ? static_cast<const S*>(args.grad_hy_recurrent) + offset : nullptr;
    const S* dc = args.grad_cy ? static_cast<const S*>(args.grad_cy) + offset : nullptr;
    const S* dc_rec = args.grad_cy_recurrent ? static_cast<const S*>(args.grad_cy_recurrent) + offset : nullptr;
    S* dz = static_cast<S*>(args.grad_gates) + 4 * offset;
    S* dc_prev = static_cast<S*>(args.grad_cx) + offset;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const rnn::LstmGates<T> a{T(load(gates[j])), T(load(gates[hidden + j])), T(load(gates[2 * hidden + j])),
                                T(load(gates[3 * hidden + j]))};
      const T grad_h = T(load(dh[j])) + optional_at(dh_rec, j);
      const T grad_c = optional_at(dc, j) + optional_at(dc_rec, j);
      const rnn::LstmGateGrads<T> d =
          rnn::lstm_gate_grads<T>(a, T(load(c_prev[j])), T(load(c_next[j])), grad_h, grad_c);
      dz[j] = store<S>(d.i);
      dz[hidden + j] = store<S>(d.f);
      dz[2 * hidden + j] = store<S>(d.g);
      dz[3 * hidden + j] = store<S>(d.o);
      dc_prev[j] = store<S>(d.c_prev);
    }
  }
}

template <Cell C, class S>
void rnn_backward(const BackwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const int64_t hidden = args.hidden;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t offset = row * hidden;
    const S* h = static_cast<const S*>(args.hy) + offset;
    const S* dh = static_cast<const S*>(args.grad_hy) + offset;
    const S* dh_rec = args.grad_hy_recurrent ? static_cast<const S*>(args.grad_hy_recurrent) + offset : nullptr;
    S* dz = static_cast<S*>(args.grad_gates) + offset;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      dz[j] = store<S>(rnn::rnn_grad<C, T>(T(load(h[j])), T(load(dh[j])) + optional_at(dh_rec, j)));
    }
  }
}

void forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  cpu::dispatch_dtype(args.dtype, [&](auto storage) {
    using S = decltype(storage);
    switch (args.cell) {
      case Cell::kLstm: lstm_forward<S>(args, begin, end); break;
      case Cell::kRnnTanh: rnn_forward<Cell::kRnnTanh, S>(args, begin, end); break;
      case Cell::kRnnRelu: rnn_forward<Cell::kRnnRelu, S>(args, begin, end); break;
    }
  });
}

void backward(const BackwardArgs& args, int64_t begin, int64_t end) {
  cpu::dispatch_dtype(args.dtype, [&](auto storage) {
    using S = decltype(storage);
    switch (args.cell) {
      case Cell::kLstm: lstm_backward<S>(args, begin, end); break;
      case Cell::kRnnTanh: rnn_backward<Cell::kRnnTanh, S>(args, begin, end); break;
      case Cell::kRnnRelu: rnn_backward<Cell::kRnnRelu, S>(args, begin, end); break;
    }
  });
}

}  // namespace

extern const rnn::CpuKernels rnn_cpu_kernels;
const rnn::CpuKernels rnn_cpu_kernels = {&forward, &backward};

}  // namespace fastlayers::FL_CPU_NS
