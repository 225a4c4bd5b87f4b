// Fused LSTM / Elman RNN pointwise kernels for CUDA. No torch headers: the glue in
// rnn_cuda.cpp checks, allocates, runs the GEMMs (cuBLAS through ATen) and passes the
// current stream. One thread per (batch row, hidden unit); compute is float (double
// for float64), storage float32/float64/float16/bfloat16; the math is rnn_math.h,
// shared with the CPU kernels.
#include <cuda_runtime.h>

#include "common/cuda_scalar.cuh"
#include "rnn/rnn_kernel.h"

namespace fastlayers::rnn {
namespace {

constexpr int kThreads = 256;

using cuda::Compute;
using cuda::from_compute;
using cuda::to_compute;

template <class S>
__global__ void lstm_forward_kernel(ForwardArgs args) {
  using T = typename Compute<S>::type;
  const int64_t hidden = args.hidden;
  const int64_t n = args.batch * hidden;
  S* z = static_cast<S*>(args.gates);
  const S* c_prev = static_cast<const S*>(args.cx);
  S* h_next = static_cast<S*>(args.hy);
  S* c_next = static_cast<S*>(args.cy);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / hidden, j = k - row * hidden;
    S* zr = z + row * 4 * hidden;
    const LstmGates<T> a = lstm_activate<T>(to_compute(zr[j]), to_compute(zr[hidden + j]),
                                            to_compute(zr[2 * hidden + j]), to_compute(zr[3 * hidden + j]));
    const T c = a.f * to_compute(c_prev[k]) + a.i * a.g;
    zr[j] = from_compute<S>(a.i);
    zr[hidden + j] = from_compute<S>(a.f);
    zr[2 * hidden + j] = from_compute<S>(a.g);
    zr[3 * hidden + j] = from_compute<S>(a.o);
    c_next[k] = from_compute<S>(c);
    h_next[k] = from_compute<S>(a.o * math::tanh(c));
  }
}

template <Cell C, class S>
__global__ void rnn_forward_kernel(ForwardArgs args) {
  using T = typename Compute<S>::type;
  const int64_t hidden = args.hidden;
  const int64_t n = args.batch * hidden;
  const S* z = static_cast<const S*>(args.gates);
  S* h_next = static_cast<S*>(args.hy);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    h_next[k] = from_compute<S>(rnn_activate<C, T>(to_compute(z[k])));
  }
}

template <class S>
__global__ void lstm_backward_kernel(BackwardArgs args) {
  using T = typename Compute<S>::type;
  const int64_t hidden = args.hidden;
  const int64_t n = args.batch * hidden;
  const S* gates = static_cast<const S*>(args.gates);
  const S* c_prev = static_cast<const S*>(args.cx);
  const S* c_next = static_cast<const S*>(args.cy);
  const S* dh = static_cast<const S*>(args.grad_hy);
  const S* dh_rec = static_cast<const S*>(args.grad_hy_recurrent);
  const S* dc = static_cast<const S*>(args.grad_cy);
  const S* dc_rec = static_cast<const S*>(args.grad_cy_recurrent);
  S* dz = static_cast<S*>(args.grad_gates);
  S* dc_prev = static_cast<S*>(args.grad_cx);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / hidden, j = k - row * hidden;
    const S* gr = gates + row * 4 * hidden;
    const LstmGates<T> a{to_compute(gr[j]), to_compute(gr[hidden + j]), to_compute(gr[2 * hidden + j]),
                         to_compute(gr[3 * hidden + j])};
    const T grad_h = to_compute(dh[k]) + to_compute(dh_rec[k]);
    const T grad_c = to_compute(dc[k]) + to_compute(dc_rec[k]);
    const LstmGateGrads<T> d = lstm_gate_grads<T>(a, to_compute(c_prev[k]), to_compute(c_next[k]), grad_h, grad_c);
    S* dzr = dz + row * 4 * hidden;
    dzr[j] = from_compute<S>(d.i);
    dzr[hidden + j] = from_compute<S>(d.f);
    dzr[2 * hidden + j] = from_compute<S>(d.g);
    dzr[3 * hidden + j] = from_compute<S>(d.o);
    dc_prev[k] = from_compute<S>(d.c_prev);
  }
}

template <Cell C, class S>
__global__ void rnn_backward_kernel(BackwardArgs args) {
  using T = typename Compute<S>::type;
  const int64_t n = args.batch * args.hidden;
  const S* h = static_cast<const S*>(args.hy);
  const S* dh = static_cast<const S*>(args.grad_hy);
  const S* dh_rec = static_cast<const S*>(args.grad_hy_recurrent);
  S* dz = static_cast<S*>(args.grad_gates);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    dz[k] = from_compute<S>(rnn_grad<C, T>(to_compute(h[k]), to_compute(dh[k]) + to_compute(dh_rec[k])));
  }
}

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest.
  return static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

}  // namespace

int launch_forward_cuda(const ForwardArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t n = args.batch * args.hidden;
  if (n == 0) return cudaSuccess;
  cuda::dispatch_dtype(args.dtype, [&](auto storage) {
    using S = decltype(storage);
    switch (args.cell) {
      case Cell::kLstm: lstm_forward_kernel<S><<<blocks_for(n), kThreads, 0, stream>>>(args); break;
      case Cell::kRnnTanh:
        rnn_forward_kernel<Cell::kRnnTanh, S><<<blocks_for(n), kThreads, 0, stream>>>(args);
        break;
      case Cell::kRnnRelu:
        rnn_forward_kernel<Cell::kRnnRelu, S><<<blocks_for(n), kThreads, 0, stream>>>(args);
        break;
    }
  });
  return cudaGetLastError();
}

int launch_backward_cuda(const BackwardArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t n = args.batch * args.hidden;
  if (n == 0) return cudaSuccess;
  cuda::dispatch_dtype(args.dtype, [&](auto storage) {
    using S = decltype(storage);
    switch (args.cell) {
      case Cell::kLstm: lstm_backward_kernel<S><<<blocks_for(n), kThreads, 0, stream>>>(args); break;
      case Cell::kRnnTanh:
        rnn_backward_kernel<Cell::kRnnTanh, S><<<blocks_for(n), kThreads, 0, stream>>>(args);
        break;
      case Cell::kRnnRelu:
        rnn_backward_kernel<Cell::kRnnRelu, S><<<blocks_for(n), kThreads, 0, stream>>>(args);
        break;
    }
  });
  return cudaGetLastError();
}

}  // namespace fastlayers::rnn
