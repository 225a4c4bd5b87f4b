// Torch-free interface between the bias_act ops (bias_act.cpp, bias_act_cuda.cpp) and
// their kernels (bias_act_cpu_kernel.cpp compiled per CPU ISA, bias_act_cuda_kernel.cu).
//
// Tensors arrive dense, viewed as [outer, channels, inner] with the bias indexed by
// the channel: NCHW gives (N, C, H*W), channels_last gives (N*H*W, C, 1).
#pragma once

#include <cstdint>

#include "bias_act/bias_act_math.h"
#include "common/cpu_isa.h"
#include "common/dtype.h"

namespace fastlayers::bias_act {

struct DenseShape {
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 0;
  FL_HOST_DEVICE int64_t numel() const { return outer * channels * inner; }
};

struct ForwardArgs {
  const void* input = nullptr;
  const void* bias = nullptr;  // [channels] or null
  void* output = nullptr;
  DenseShape shape;
  DType dtype = DType::kFloat32;
  Activation activation = Activation::kIdentity;
};

struct BackwardArgs {
  const void* grad_output = nullptr;
  const void* saved = nullptr;  // output y or input x, see saves_output()
  const void* bias = nullptr;   // [channels] or null
  void* grad_input = nullptr;
  // [groups, channels] partial sums of grad_input, or null when there is no bias:
  // double on the CPU; on CUDA float, or double for float64. Summing the groups in
  // order gives grad_bias; the grouping depends only on the shape, so the result is
  // bitwise the same for any thread count.
  void* bias_partials = nullptr;
  int64_t rows_per_group = 1;
  DenseShape shape;
  DType dtype = DType::kFloat32;
  Activation activation = Activation::kIdentity;
};

// CPU work is split into units. With inner > 1 a unit is one (outer, channel) plane
// of `inner` elements, and a partial-sum group is one outer index. With inner == 1
// (channels_last) a unit is a row of `channels` elements in the forward, and a group
// of `rows_per_group` rows in the backward, which is also its partial-sum group.
struct CpuKernels {
  void (*forward)(const ForwardArgs& args, int64_t unit_begin, int64_t unit_end);
  void (*backward)(const BackwardArgs& args, int64_t unit_begin, int64_t unit_end);
};

#if defined(FASTLAYERS_WITH_CUDA) || defined(__CUDACC__)
// Each returns a cudaError_t as int (0 = success); `stream` is a cudaStream_t.
int launch_forward_cuda(const ForwardArgs& args, void* stream);
// With a bias, args.bias_partials is a device buffer of
// [bias_partial_groups_cuda(shape), channels] accumulators, and grad_bias receives the
// [channels] result in the bias dtype.
int launch_backward_cuda(const BackwardArgs& args, void* grad_bias, void* stream);
int64_t bias_partial_groups_cuda(const DenseShape& shape);
#endif

}  // namespace fastlayers::bias_act

FL_DECLARE_CPU_KERNEL_TABLE(fastlayers::bias_act::CpuKernels, bias_act_cpu_kernels)
