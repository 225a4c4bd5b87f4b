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
  // inputs; -inf for a row that sees no key, whose output is 0). dropout_p > 0 drops
  // probabilities with the counter-based mask of csrc/attention/dropout.h keyed by
  // dropout_seed (CPU int64 [seed, offset]); the backward takes the same pair.
  m.def("flash_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float scale,"
        " float dropout_p=0.0, Tensor? dropout_seed=None) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // (grad_query, grad_key, grad_value), probabilities recomputed from logsumexp.
  m.def("flash_attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor output,"
        " Tensor logsumexp, Tensor? attn_mask, bool is_causal, float scale, float dropout_p=0.0,"
        " Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});

  // 2-D convolution (NCHW sizes; channels_last accepted), y = conv(input, weight) + bias,
  // then max(y, 0) when relu. Output channels_last when input or weight is.
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, bool relu) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // d loss / d input of conv2d (without its epilogue); channels_last when grad_output is.
  m.def("conv2d_backward_input(Tensor grad_output, Tensor weight, int[4] input_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // d loss / d weight of conv2d, contiguous [C_out, C_in / groups, kH, kW].
  m.def("conv2d_backward_weight(Tensor grad_output, Tensor input, int[4] weight_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // d loss / d bias of conv2d: grad_output summed over N, H, W.
  m.def("conv2d_backward_bias(Tensor grad_output) -> Tensor", {at::Tag::pt2_compliant_tag});
  // (max_pool2d(relu(conv2d(...)), 2, 2), argmax): argmax (uint8, 0..3) is the position of
  // each maximum in its 2x2 window, in scan order; the pre-pool activation is not stored.
  m.def("conv2d_relu_max_pool2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // d loss / d (conv output before the ReLU) from the pooled output's gradient, the pooled
  // output and argmax; channels_last, of shape conv_size.
  m.def("conv2d_relu_max_pool2d_backward(Tensor grad_output, Tensor output, Tensor argmax, int[4] conv_size) "
        "-> Tensor",
        {at::Tag::pt2_compliant_tag});

  // LSTM (gates i, f, g, o as torch) and Elman RNN (nonlinearity "tanh" or "relu").
  // Single steps: input [B, I], hx/cx [B, H], w_ih [G*H, I], w_hh [G*H, H], biases
  // [G*H] (G = 4 for the LSTM, 1 for the RNN). lstm_cell returns (hy, cy, gates),
  // gates = the activated i, f, g, o [B, 4H] its backward needs. The backwards return
  // (grad_input, grad_hx, [grad_cx,] grad_w_ih, grad_w_hh, grad_bias); grad_bias is
  // the gradient of b_ih and of b_hh alike, shape [0] when has_bias is false.
  m.def("lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh)"
        " -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("lstm_cell_backward(Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor w_ih,"
        " Tensor w_hh, Tensor gates, Tensor cy, bool has_bias)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("rnn_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " str nonlinearity) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("rnn_cell_backward(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor hy,"
        " bool has_bias, str nonlinearity) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Whole layers, one direction, time-major input [T, B, I]: lstm_layer returns
  // (output [T, B, H], cells [T, B, H] = c after every step, gates [T, B, 4H]). With
  // w_hr [P, H] (projection, torch's proj_size): hx, output [.., P], w_hh [4H, P]; the
  // backward then also returns grad_w_hr (else shape [0]). With batch_sizes (a
  // PackedSequence's, int64 on the CPU) input is the packed data [rows, I] and every
  // [T, B, X] above is [rows, X]; reverse runs the steps last to first. The layer
  // backwards compute grad_input only with input_grad, and the weight and bias
  // gradients only with weight_grad (else each comes back with shape [0]).
  m.def("lstm_layer(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " Tensor? w_hr=None, Tensor? batch_sizes=None, bool reverse=False) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("lstm_layer_backward(Tensor grad_output, Tensor grad_cells, Tensor input, Tensor hx, Tensor cx,"
        " Tensor w_ih, Tensor w_hh, Tensor output, Tensor cells, Tensor gates, bool has_bias, Tensor? w_hr=None,"
        " Tensor? batch_sizes=None, bool reverse=False, bool input_grad=True, bool weight_grad=True)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("rnn_layer(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " str nonlinearity, Tensor? batch_sizes=None, bool reverse=False) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("rnn_layer_backward(Tensor grad_output, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output,"
        " bool has_bias, str nonlinearity, Tensor? batch_sizes=None, bool reverse=False, bool input_grad=True,"
        " bool weight_grad=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}
