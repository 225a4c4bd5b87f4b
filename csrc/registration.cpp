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
  // backward then also returns grad_w_hr (else shape [0]).
  m.def("lstm_layer(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " Tensor? w_hr=None) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("lstm_layer_backward(Tensor grad_output, Tensor grad_cells, Tensor input, Tensor hx, Tensor cx,"
        " Tensor w_ih, Tensor w_hh, Tensor output, Tensor cells, Tensor gates, bool has_bias, Tensor? w_hr=None)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("rnn_layer(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " str nonlinearity) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("rnn_layer_backward(Tensor grad_output, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output,"
        " bool has_bias, str nonlinearity) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}
