// Every fastlayers operator schema, in one place. Device kernels are registered next to
// their implementations (TORCH_LIBRARY_IMPL in csrc/<op>/); fake (meta) kernels and
// autograd are registered from Python (python/fastlayers/ops/<op>.py).
#include <torch/library.h>

TORCH_LIBRARY(fastlayers, m) {
  // y = act(input + bias[None, :, None, ...]); bias along dimension 1 (channels).
  m.def("bias_act(Tensor input, Tensor? bias, str activation) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // (grad_input, grad_bias); `saved` is the forward's output for identity/relu/tanh/
  // sigmoid and its input for gelu/silu. grad_bias has shape [0] when bias is None.
  m.def("bias_act_backward(Tensor grad_output, Tensor saved, Tensor? bias, str activation) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Flash attention: query (B, H, Lq, E), key (B, Hkv, Lk, E), value (B, Hkv, Lk, Ev),
  // H a multiple of Hkv; attn_mask bool (True = attend) or additive in query's dtype,
  // broadcastable to (B, H, Lq, Lk); is_causal hides key j from query i when j > i.
  // Returns (output (B, H, Lq, Ev), logsumexp (B, H, Lq): float32, float64 for float64
  // inputs; -inf for a row that sees no key, whose output is 0).
  m.def("flash_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float scale)"
        " -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // (grad_query, grad_key, grad_value), probabilities recomputed from logsumexp.
  m.def("flash_attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor output,"
        " Tensor logsumexp, Tensor? attn_mask, bool is_causal, float scale) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}
