"""Drop-in replacements for ``torch.nn`` layers, each with ``from_torch(module)``."""

from fastlayers.nn.attention import LuongAttention, MultiheadAttention
from fastlayers.nn.conv import Conv1d, Conv2d, Conv2dReLU, Conv2dReLUMaxPool2d
from fastlayers.nn.rnn import LSTM, RNN, LSTMCell, RNNCell

__all__ = [
    "LSTM",
    "RNN",
    "Conv1d",
    "Conv2d",
    "Conv2dReLU",
    "Conv2dReLUMaxPool2d",
    "LSTMCell",
    "LuongAttention",
    "MultiheadAttention",
    "RNNCell",
]
