"""Functional interface, mirroring ``torch.nn.functional``: each function takes the
arguments of its torch twin where one exists, runs the compiled kernel for the tensors'
device when available, and its pure-PyTorch reference otherwise."""

from fastlayers.ops.attention import scaled_dot_product_attention
from fastlayers.ops.bias_act import bias_act
from fastlayers.ops.conv2d import conv1d, conv2d, conv2d_relu, conv2d_relu_max_pool2d
from fastlayers.ops.rnn import lstm, lstm_cell, rnn, rnn_relu_cell, rnn_tanh_cell

__all__ = [
    "bias_act",
    "conv1d",
    "conv2d",
    "conv2d_relu",
    "conv2d_relu_max_pool2d",
    "lstm",
    "lstm_cell",
    "rnn",
    "rnn_relu_cell",
    "rnn_tanh_cell",
    "scaled_dot_product_attention",
]
