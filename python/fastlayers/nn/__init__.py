"""Drop-in replacements for ``torch.nn`` layers, each with ``from_torch(module)``."""

from fastlayers.nn.rnn import LSTM, RNN, LSTMCell, RNNCell

__all__ = ["LSTM", "LSTMCell", "RNN", "RNNCell"]
