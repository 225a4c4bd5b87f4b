// Torch-free interface between the recurrent ops (rnn.cpp, rnn_cuda.cpp) and their
// fused pointwise kernels (rnn_cpu_kernel.cpp compiled per CPU ISA, rnn_cuda_kernel.cu).
//
// One step of one layer: the ops compute the GEMM sums x W_ih^T + b_ih + b_hh + h W_hh^T
// into a dense [batch, gate_count * hidden] matrix (the biases ride on the input
// projection GEMM, once for all timesteps); the forward kernel applies the cell, the backward kernel turns the gradients arriving at h' (and c')
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
  // [batch, gate_count * hidden]: the pre-activations z. LSTM: overwritten in place
  // with the activated gates i, f, g, o (what the backward needs). RNN: only read.
  void* gates = nullptr;
  const void* cx = nullptr;       // LSTM: the previous cell state [batch, hidden]
  void* hy = nullptr;             // [batch, hidden]
  void* cy = nullptr;             // LSTM: [batch, hidden]
};

struct BackwardArgs {
  Cell cell = Cell::kLstm;
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int64_t hidden = 0;
  // The gradient at h' is grad_hy + grad_hy_recurrent (from the output and from step
  // t + 1), at c' grad_cy + grad_cy_recurrent; none is null (the ops pass zeros at the
  // last step, so the loops carry no branches). grad_cx may alias grad_cy_recurrent:
  // each element is read before it is written, by the same thread.
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

// float32 / float64 GEMM C[m, n] (+)= A[m, k] B[k, n] with B packed into column panels
// of gemm_panel_width(dtype) elements: panel p holds B[:, p*w : (p+1)*w] row by row,
// zero-padded. Work is split into tasks: (row block r, panel p) is task r * panels + p,
// a row block being `row_block` rows. Pointers are to elements of `dtype`.
struct GemmArgs {
  DType dtype = DType::kFloat32;  // kFloat32 or kFloat64
  const void* a = nullptr;  // row-major with row stride lda, or column-major with column stride lda
  bool a_column_major = false;
  int64_t lda = 0;
  const void* packed_b = nullptr;
  void* c = nullptr;  // row-major, row stride ldc
  int64_t ldc = 0;
  int64_t m = 0, n = 0, k = 0;
  int64_t row_block = 0;
  bool accumulate = false;  // C += A B, else C = A B
  const void* bias = nullptr;  // [n] or null: C = A B + bias in every row (accumulate false)
};

// CPU work is split by batch rows [row_begin, row_end) for the pointwise kernels and
// by tasks [task_begin, task_end) for the GEMM.
struct CpuKernels {
  void (*forward)(const ForwardArgs& args, int64_t row_begin, int64_t row_end);
  void (*backward)(const BackwardArgs& args, int64_t row_begin, int64_t row_end);
  int64_t (*gemm_panel_width)(DType dtype);
  // Packs B[k, n] (element (i, j) at b[i * stride_k + j * stride_n]) into
  // ceil(n / width) * k * width elements of `dtype` (kFloat32 or kFloat64).
  void (*pack_b)(DType dtype, const void* b, int64_t k, int64_t n, int64_t stride_k, int64_t stride_n, void* packed);
  void (*gemm)(const GemmArgs& args, int64_t task_begin, int64_t task_end);
  // dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (`dtype` kFloat32 or
  // kFloat64); the caller splits large transposes over threads by destination rows.
  void (*transpose)(DType dtype, const void* src, int64_t lds, int64_t rows, int64_t cols, void* dst, int64_t ldd);
};

#if defined(FASTLAYERS_WITH_CUDA) || defined(__CUDACC__)
// Each returns a cudaError_t as int (0 = success); `stream` is a cudaStream_t.
int launch_forward_cuda(const ForwardArgs& args, void* stream);
int launch_backward_cuda(const BackwardArgs& args, void* stream);
#endif

}  // namespace fastlayers::rnn

FL_DECLARE_CPU_KERNEL_TABLE(fastlayers::rnn::CpuKernels, rnn_cpu_kernels)
