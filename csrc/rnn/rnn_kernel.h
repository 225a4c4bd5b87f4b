// Torch-free interface between the recurrent ops (rnn.cpp, rnn_cuda.cpp) and their
// fused pointwise kernels (rnn_cpu_kernel.cpp compiled per CPU ISA, rnn_cuda_kernel.cu).
//
// One step of one layer: the ops compute the GEMM sums x W_ih^T + h W_hh^T into a
// dense [batch, gate_count * hidden] matrix; the forward kernel adds the biases and
// applies the cell, the backward kernel turns the gradients arriving at h' (and c')
// into the gradients of the pre-activations, which the ops feed to the GEMMs again.
// Every matrix is dense, row-major, with rows of `hidden` (states) or
// `gate_count * hidden` (gates) elements.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "rnn/rnn_math.h"

namespace fastlayers::rnn {

struct ForwardArgs {
  Cell cell = Cell::kLstm;
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int64_t hidden = 0;
  // [batch, gate_count * hidden]: the GEMM sums. LSTM: overwritten in place with the
  // activated gates i, f, g, o (what the backward needs). RNN: only read.
  void* gates = nullptr;
  const void* bias_ih = nullptr;  // [gate_count * hidden] or null
  const void* bias_hh = nullptr;  // [gate_count * hidden] or null
  const void* cx = nullptr;       // LSTM: the previous cell state [batch, hidden]
  void* hy = nullptr;             // [batch, hidden]
  void* cy = nullptr;             // LSTM: [batch, hidden]
};

struct BackwardArgs {
  Cell cell = Cell::kLstm;
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int64_t hidden = 0;
  // The gradient at h' is grad_hy + grad_hy_recurrent, at c' grad_cy + grad_cy_recurrent;
  // each second term may be null (zero). grad_cx may alias grad_cy_recurrent: each
  // element is read before it is written, by the same thread.
  const void* grad_hy = nullptr;
  const void* grad_hy_recurrent = nullptr;
  const void* grad_cy = nullptr;  // LSTM
  const void* grad_cy_recurrent = nullptr;
  const void* gates = nullptr;  // LSTM: the activated gates the forward left
  const void* cx = nullptr;     // LSTM: c, the cell state the step started from
  const void* cy = nullptr;     // LSTM: c'
  const void* hy = nullptr;     // RNN: h'
  void* grad_gates = nullptr;   // [batch, gate_count * hidden]: d loss / d z
  void* grad_cx = nullptr;      // LSTM: d loss / d c
};

// CPU work is split by batch rows: [row_begin, row_end).
struct CpuKernels {
  void (*forward)(const ForwardArgs& args, int64_t row_begin, int64_t row_end);
  void (*backward)(const BackwardArgs& args, int64_t row_begin, int64_t row_end);
};

#if defined(FASTLAYERS_WITH_CUDA) || defined(__CUDACC__)
// Each returns a cudaError_t as int (0 = success); `stream` is a cudaStream_t.
int launch_forward_cuda(const ForwardArgs& args, void* stream);
int launch_backward_cuda(const BackwardArgs& args, void* stream);
#endif

}  // namespace fastlayers::rnn

FL_DECLARE_CPU_KERNEL_TABLE(fastlayers::rnn::CpuKernels, rnn_cpu_kernels)
