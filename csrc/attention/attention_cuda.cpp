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
  // Grid x is (batch, head) pairs, and (batch, head, query row) / 4 for the row-dot pass:
  // CUDA allows 2^31 - 1 blocks along x.
  constexpr int64_t kMaxGridX = 0x7fffffff;
  TORCH_CHECK(s.batch * s.heads <= kMaxGridX && ceil_div(s.batch * s.heads * s.q_len, 4) <= kMaxGridX, op,
              ": batch * heads (", s.batch, " * ", s.heads, ") and batch * heads * query length / 4 must be below 2^31 on CUDA");
}

std::tuple<at::Tensor, at::Tensor> flash_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                        const at::Tensor& value,
                                                        const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                        double scale, double dropout_p,
                                                        const std::optional<at::Tensor>& dropout_seed) {
  const c10::cuda::CUDAGuard guard(query.device());
  ForwardCall c =
      prepare_forward(query, key, value, attn_mask, is_causal, scale, dropout_p, dropout_seed, &check_cuda_limits);
  check_launch(launch_forward_cuda(c.args, at::cuda::getCurrentCUDAStream().stream()), "flash_attention");
  return {c.output, c.logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const c10::cuda::CUDAGuard guard(query.device());
  BackwardCall c = prepare_backward(grad_output, query, key, value, output, logsumexp, attn_mask, is_causal, scale,
                                    dropout_p, dropout_seed, &check_cuda_limits);
  // Zero-filled: with no query rows (or none that reach a key block) nothing is written.
  c.grad_key.zero_();
  c.grad_value.zero_();
  check_launch(launch_backward_cuda(c.args, at::cuda::getCurrentCUDAStream().stream()), "flash_attention_backward");
  return {c.grad_query, c.grad_key, c.grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CUDA, m) {
  m.impl("flash_attention", &flash_attention_cuda);
  m.impl("flash_attention_backward", &flash_attention_backward_cuda);
}

}  // namespace fastlayers::attention
