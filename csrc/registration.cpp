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
}
