// bias_act CUDA kernels. Include no torch headers: the glue in bias_act_cuda.cpp
// allocates, checks and passes the current stream. Compute is float (double for
// float64); the per-element math is bias_act_math.h, shared with the CPU kernels.
#include <cuda_runtime.h>

#include <algorithm>

#include "bias_act/bias_act_kernel.h"
#include "common/cuda_scalar.cuh"

namespace fastlayers::bias_act {
namespace {

constexpr int kThreads = 256;
// Columns (channels) and row lanes of a channels_last backward block.
constexpr int kColumns = 32;
constexpr int kRowLanes = 8;
// Elements a backward block of the plane layout reduces, at most.
constexpr int64_t kElementsPerGroup = 16384;

using cuda::Compute;
using cuda::from_compute;
using cuda::to_compute;

template <Activation A, class T>
__device__ __forceinline__ T grad_z(T grad_out, T saved, T b) {
  if constexpr (saves_output(A)) {
    return grad_out * activation_grad_from_output<A, T>(saved);
  } else {
    return grad_out * activation_grad_from_input<A, T>(saved + b);
  }
}

__device__ __forceinline__ int64_t channel_of(int64_t index, const DenseShape& shape) {
  return (index / shape.inner) % shape.channels;
}

template <Activation A, class S>
__global__ void forward_kernel(const S* __restrict__ input, const S* __restrict__ bias, S* __restrict__ output,
                               DenseShape shape) {
  using T = typename Compute<S>::type;
  const int64_t n = shape.numel();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    T z = to_compute(input[i]);
    if (bias) z += to_compute(bias[channel_of(i, shape)]);
    output[i] = from_compute<S>(activation_forward<A, T>(z));
  }
}

// grad_input only (no bias to reduce).
template <Activation A, class S>
__global__ void backward_input_kernel(const S* __restrict__ grad_output, const S* __restrict__ saved,
                                      S* __restrict__ grad_input, DenseShape shape) {
  using T = typename Compute<S>::type;
  const int64_t n = shape.numel();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    grad_input[i] = from_compute<S>(grad_z<A, T>(to_compute(grad_output[i]), to_compute(saved[i]), T(-0.0)));
  }
}

// Plane layout (inner > 1): block (channel c, group g) covers elements k in
// [g*per_group, (g+1)*per_group) of the channel's outer*inner elements, writes their
// grad_input and one partial sum. Coalesced along inner.
template <Activation A, class S, class Acc>
__global__ void backward_planes_kernel(const S* __restrict__ grad_output, const S* __restrict__ saved,
                                       const S* __restrict__ bias, S* __restrict__ grad_input,
                                       Acc* __restrict__ partials, DenseShape shape, int64_t per_group) {
  using T = typename Compute<S>::type;
  __shared__ Acc shared[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t group = blockIdx.y;
  const int64_t total = shape.outer * shape.inner;
  const int64_t begin = group * per_group;
  const int64_t end = begin + per_group < total ? begin + per_group : total;
  const T b = to_compute(bias[c]);
  Acc sum = 0;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const int64_t o = k / shape.inner;
    const int64_t i = (o * shape.channels + c) * shape.inner + (k - o * shape.inner);
    T g = grad_z<A, T>(to_compute(grad_output[i]), to_compute(saved[i]), b);
    grad_input[i] = from_compute<S>(g);
    sum += Acc(g);
  }
  shared[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[group * shape.channels + c] = shared[0];
}

// Row layout (inner == 1, channels_last): block (column tile, group) with threads
// (column lane x, row lane y); each thread walks rows y, y+8, ... of its group.
template <Activation A, class S, class Acc>
__global__ void backward_rows_kernel(const S* __restrict__ grad_output, const S* __restrict__ saved,
                                     const S* __restrict__ bias, S* __restrict__ grad_input,
                                     Acc* __restrict__ partials, DenseShape shape, int64_t rows_per_group) {
  using T = typename Compute<S>::type;
  __shared__ Acc shared[kRowLanes][kColumns];
  const int64_t c = int64_t(blockIdx.x) * kColumns + threadIdx.x;
  const int64_t group = blockIdx.y;
  const int64_t row_begin = group * rows_per_group;
  const int64_t row_end = row_begin + rows_per_group < shape.outer ? row_begin + rows_per_group : shape.outer;
  Acc sum = 0;
  if (c < shape.channels) {
    const T b = to_compute(bias[c]);
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kRowLanes) {
      const int64_t i = r * shape.channels + c;
      T g = grad_z<A, T>(to_compute(grad_output[i]), to_compute(saved[i]), b);
      grad_input[i] = from_compute<S>(g);
      sum += Acc(g);
    }
  }
  shared[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < shape.channels) {
    Acc total = 0;
    for (int y = 0; y < kRowLanes; ++y) total += shared[y][threadIdx.x];
    partials[group * shape.channels + c] = total;
  }
}

// grad_bias[c] = sum of the groups' partials, in group order.
template <class S, class Acc>
__global__ void finalize_bias_kernel(const Acc* __restrict__ partials, S* __restrict__ grad_bias, int64_t groups,
                                     int64_t channels) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  Acc total = 0;
  for (int64_t g = 0; g < groups; ++g) total += partials[g * channels + c];
  grad_bias[c] = from_compute<S>(total);
}

int elementwise_blocks(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; 65535 * 8 blocks keeps every SM busy.
  return static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

template <class Fn>
void dispatch(DType dtype, Activation act, Fn&& fn) {
  auto with_act = [&](auto storage) {
    using S = decltype(storage);
    switch (act) {
      case Activation::kIdentity: fn.template operator()<Activation::kIdentity, S>(); break;
      case Activation::kRelu: fn.template operator()<Activation::kRelu, S>(); break;
      case Activation::kGelu: fn.template operator()<Activation::kGelu, S>(); break;
      case Activation::kSilu: fn.template operator()<Activation::kSilu, S>(); break;
      case Activation::kTanh: fn.template operator()<Activation::kTanh, S>(); break;
      case Activation::kSigmoid: fn.template operator()<Activation::kSigmoid, S>(); break;
    }
  };
  switch (dtype) {
    case DType::kFloat32: with_act(float{}); break;
    case DType::kFloat64: with_act(double{}); break;
    case DType::kFloat16: with_act(__half{}); break;
    case DType::kBFloat16: with_act(__nv_bfloat16{}); break;
  }
}

// How the backward splits each channel's elements (plane layout) or the rows (row
// layout) into partial-sum groups; gridDim.y allows at most 65535 groups.
struct GroupLayout {
  int64_t groups = 0;
  int64_t per_group = 0;  // elements (planes) or rows (rows layout)
};

GroupLayout group_layout(const DenseShape& shape) {
  constexpr int64_t kMaxGroups = 65535;
  const int64_t total = shape.inner > 1 ? shape.outer * shape.inner : shape.outer;
  int64_t per_group = shape.inner > 1 ? kElementsPerGroup : kElementsPerGroup / kColumns;
  per_group = std::max(per_group, (total + kMaxGroups - 1) / kMaxGroups);
  return {total == 0 ? 0 : (total + per_group - 1) / per_group, per_group};
}

}  // namespace

int64_t bias_partial_groups_cuda(const DenseShape& shape) { return group_layout(shape).groups; }

int launch_forward_cuda(const ForwardArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t n = args.shape.numel();
  if (n == 0) return cudaSuccess;
  dispatch(args.dtype, args.activation, [&]<Activation A, class S>() {
    forward_kernel<A, S><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        static_cast<const S*>(args.input), static_cast<const S*>(args.bias), static_cast<S*>(args.output), args.shape);
  });
  return cudaGetLastError();
}

int launch_backward_cuda(const BackwardArgs& args, void* grad_bias, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const DenseShape& shape = args.shape;
  const int64_t n = shape.numel();
  dispatch(args.dtype, args.activation, [&]<Activation A, class S>() {
    using Acc = typename Compute<S>::type;
    const S* grad_output = static_cast<const S*>(args.grad_output);
    const S* saved = static_cast<const S*>(args.saved);
    const S* bias = static_cast<const S*>(args.bias);
    S* grad_input = static_cast<S*>(args.grad_input);
    Acc* partials = static_cast<Acc*>(args.bias_partials);
    if (!bias) {
      if (n > 0) {
        backward_input_kernel<A, S><<<elementwise_blocks(n), kThreads, 0, stream>>>(grad_output, saved, grad_input,
                                                                                    shape);
      }
      return;
    }
    const GroupLayout layout = group_layout(shape);
    const int64_t groups = layout.groups;
    if (groups > 0) {
      if (shape.inner > 1) {
        dim3 grid(static_cast<unsigned>(shape.channels), static_cast<unsigned>(groups));
        backward_planes_kernel<A, S, Acc><<<grid, kThreads, 0, stream>>>(grad_output, saved, bias, grad_input,
                                                                         partials, shape, layout.per_group);
      } else {
        dim3 grid(static_cast<unsigned>((shape.channels + kColumns - 1) / kColumns), static_cast<unsigned>(groups));
        dim3 block(kColumns, kRowLanes);
        backward_rows_kernel<A, S, Acc><<<grid, block, 0, stream>>>(grad_output, saved, bias, grad_input, partials,
                                                                    shape, layout.per_group);
      }
    }
    if (shape.channels > 0) {
      const int blocks = static_cast<int>((shape.channels + kThreads - 1) / kThreads);
      finalize_bias_kernel<S, Acc><<<blocks, kThreads, 0, stream>>>(partials, static_cast<S*>(grad_bias), groups,
                                                                    shape.channels);
    }
  });
  return cudaGetLastError();
}

}  // namespace fastlayers::bias_act
