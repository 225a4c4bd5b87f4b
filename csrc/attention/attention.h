// Argument checks and tensor-to-kernel plumbing shared by the CPU and CUDA flash
// attention ops (attention.cpp, attention_cuda.cpp).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "attention/attention_kernel.h"

namespace fastlayers::attention {

// `t` is on query's device and has query's dtype (naming `name` otherwise).
void check_same(const at::Tensor& t, const at::Tensor& query, const char* op, const char* name);

// Validates query/key/value (4-D, matching sizes, H a multiple of Hkv) and the mask
// (bool or query's dtype, broadcastable to (B, H, Lq, Lk)); returns the shape.
Shape check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                   const std::optional<at::Tensor>& attn_mask, const char* op);

// check_inputs plus grad_output, output and logsumexp against the forward's shapes.
Shape check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
                            const std::optional<at::Tensor>& attn_mask, const char* op);

// `t`, copied only when its last dimension is not contiguous.
at::Tensor rows_contiguous(const at::Tensor& t);
RowStrides row_strides(const at::Tensor& t);

// The mask as an additive tensor of the query's dtype, viewed (B, H, Lq, Lk) with
// stride 0 along broadcast dimensions: no copy for a float mask, and a bool mask is
// converted at its own (unbroadcast) size.
at::Tensor additive_mask(const at::Tensor& mask, const at::Tensor& query, const Shape& s);

Inputs make_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                   const Shape& s, bool is_causal, double scale, const char* op);

// Checks dropout_p (in [0, 1]) and, when it is > 0, dropout_seed (a CPU int64 tensor
// [seed, offset]); the kernels' dropout parameters (disabled for dropout_p == 0).
DropoutParams dropout_params(double dropout_p, const std::optional<at::Tensor>& dropout_seed, const char* op);

// float64 for float64 inputs, else float32.
at::ScalarType lse_dtype(const at::Tensor& query);

// One flash_attention call, checked and laid out for a kernel: the tensors the kernel
// arguments point into (kept alive here) and the arguments. `check_device` adds a
// device's own limits to the checks, before anything is allocated (CUDA: a current
// device guard must be in place). The CPU and CUDA glue only launch.
struct CallInputs {
  Shape shape;
  at::Tensor q, k, v, mask;  // rows contiguous; the mask additive, viewed (B, H, Lq, Lk)
};
struct ForwardCall : CallInputs {
  at::Tensor output, logsumexp;
  ForwardArgs args;
};
using DeviceCheck = void (*)(const Shape& shape, const char* op);
ForwardCall prepare_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
                            double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                            DeviceCheck check_device = nullptr);

// The same for flash_attention_backward; grad_query/key/value are allocated
// uninitialized, row_dot (D = rowsum(dO * O)) too.
struct BackwardCall : CallInputs {
  at::Tensor grad_output, output, logsumexp, row_dot, grad_query, grad_key, grad_value;
  BackwardArgs args;
};
BackwardCall prepare_backward(const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
                              const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
                              double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                              DeviceCheck check_device = nullptr);

}  // namespace fastlayers::attention
