// CUDA implementation of fastlayers::flash_attention / flash_attention_backward: checks
// and allocation here, kernels in attention_cuda_kernel.cu, launched on the current
// stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention/attention.h"

namespace fastlayers::attention {
namespace {

void check_launch(int status, const char* op) {
  auto error = static_cast<cudaError_t>(status);
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

void check_cuda_limits(const Shape& s, const char* op) {
  TORCH_CHECK(s.head_dim <= kCudaMaxHeadDim && s.value_dim <= kCudaMaxHeadDim, op,
              ": the CUDA kernels take head and value dims up to ", kCudaMaxHeadDim, ", got ", s.head_dim, " and ",
              s.value_dim, " (fastlayers.functional.scaled_dot_product_attention runs the reference for them)");
  TORCH_CHECK(ceil_div(std::max(s.q_len, s.kv_len), 8) <= 65535, op,
              ": sequence lengths up to 524280 on CUDA, got query length ", s.q_len, " and key length ", s.kv_len);
}

std::tuple<at::Tensor, at::Tensor> flash_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                        const at::Tensor& value,
                                                        const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                        double scale, double dropout_p,
                                                        const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "flash_attention";
  const Shape s = check_inputs(query, key, value, attn_mask, op);
  const DropoutParams dropout = dropout_params(dropout_p, dropout_seed, op);
  check_cuda_limits(s, op);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  at::Tensor mask = attn_mask.has_value() ? additive_mask(*attn_mask, q, s) : at::Tensor();
  at::Tensor output = at::empty({s.batch, s.heads, s.q_len, s.value_dim}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(lse_dtype(q)));
  ForwardArgs args;
  args.in = make_inputs(q, k, v, mask, s, is_causal, scale, op);
  args.in.dropout = dropout;
  args.output = output.mutable_data_ptr();
  args.logsumexp = lse.mutable_data_ptr();
  check_launch(launch_forward_cuda(args, at::cuda::getCurrentCUDAStream().stream()), op);
  return {output, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const char* op = "flash_attention_backward";
  const Shape s = check_backward_inputs(grad_output, query, key, value, output, logsumexp, attn_mask, op);
  const DropoutParams dropout = dropout_params(dropout_p, dropout_seed, op);
  check_cuda_limits(s, op);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  at::Tensor g = rows_contiguous(grad_output);
  at::Tensor o = output.contiguous(), lse = logsumexp.contiguous();
  at::Tensor mask = attn_mask.has_value() ? additive_mask(*attn_mask, q, s) : at::Tensor();
  at::Tensor grad_query = at::empty({s.batch, s.heads, s.q_len, s.head_dim}, q.options());
  // Zero-filled: with no query rows (or none that reach a key block) nothing is written.
  at::Tensor grad_key = at::zeros({s.batch, s.kv_heads, s.kv_len, s.head_dim}, q.options());
  at::Tensor grad_value = at::zeros({s.batch, s.kv_heads, s.kv_len, s.value_dim}, q.options());
  at::Tensor row_dot = at::empty({s.batch, s.heads, s.q_len}, lse.options());
  BackwardArgs args;
  args.in = make_inputs(q, k, v, mask, s, is_causal, scale, op);
  args.in.dropout = dropout;
  args.grad_output = g.const_data_ptr();
  args.grad_output_strides = row_strides(g);
  args.output = o.const_data_ptr();
  args.logsumexp = lse.const_data_ptr();
  args.row_dot = row_dot.mutable_data_ptr();
  args.grad_query = grad_query.mutable_data_ptr();
  args.grad_key = grad_key.mutable_data_ptr();
  args.grad_value = grad_value.mutable_data_ptr();
  check_launch(launch_backward_cuda(args, at::cuda::getCurrentCUDAStream().stream()), op);
  return {grad_query, grad_key, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("flash_attention", &flash_attention_cuda);
  m.impl("flash_attention_backward", &flash_attention_backward_cuda);
}

}  // namespace fastlayers::attention
