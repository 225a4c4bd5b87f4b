"""The documented models, built on fastlayers layers.

    model = fastlayers.models.build("lstm", input_size=1, num_classes=10)
    logits = model(x)                      # x: (batch, steps, input_size) -> (batch, classes)

Image models take float ``(N, C, H, W)``; sequence models take ``(N, T, input_size)``
(batch first). Every model returns logits ``(N, num_classes)``. The defaults are the
seed's: ``CNN()`` is conv(3->32, 3x3, pad 1) -> ReLU -> max-pool 2 -> conv(32->64) ->
ReLU -> max-pool 2 -> linear(64*8*8->128) -> ReLU -> linear(128->10) for 3x32x32
images; the recurrent classifiers read 10 features a step with 2 layers of 50 units.

``fastlayers.revert(copy.deepcopy(model))`` is each model's twin on ``torch.nn``
layers with the same state_dict keys and weights (``LuongAttention``, which has no
``torch.nn`` twin, stays).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastlayers import nn as fnn

__all__ = [
    "CNN",
    "MODELS",
    "AttentionClassifier",
    "LSTMClassifier",
    "RNNClassifier",
    "SelfAttentionClassifier",
    "build",
]


class CNN(nn.Module):
    """Convolutional image classifier on fused ``Conv2dReLUMaxPool2d`` blocks.

    One block per entry of ``channels`` (3x3 convolution, padding 1, then ReLU and a 2x2
    max-pool, in one op), then ``linear(channels[-1] * (image_size / 2**blocks)**2 ->
    hidden_size) -> ReLU -> linear(hidden_size -> num_classes)``. ``image_size`` (square
    images) must be divisible by ``2**len(channels)`` (by 4 for the default two blocks).

    ``features`` keeps torch's layout of the same network: each fused block is followed
    by two ``nn.Identity`` placeholders where ``torch.nn`` has its ReLU and MaxPool2d, so
    ``fastlayers.revert`` turns it into conv, ReLU, pool at the same indices and the
    state_dict keys of the two twins are the same (``features.0.weight``,
    ``features.3.weight``, ``classifier.1.weight``, ...).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 128,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ValueError("CNN: channels must name at least one convolution width, got ()")
        downsampling = 2 ** len(channels)
        if image_size <= 0 or image_size % downsampling:
            raise ValueError(
                f"CNN: image_size must be a positive multiple of {downsampling} "
                f"({len(channels)} blocks each halve it), got {image_size}"
            )
        layers: list[nn.Module] = []
        for width_in, width_out in zip((in_channels,) + channels[:-1], channels):
            layers += [fnn.Conv2dReLUMaxPool2d(width_in, width_out, 3, padding=1), nn.Identity(), nn.Identity()]
        self.features = nn.Sequential(*layers)
        side = image_size // downsampling
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[-1] * side * side, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _last_step(h_n: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """The top layer's output at each direction's last step: the forward direction's at
    step T-1 and, when bidirectional, the backward direction's at step 0 (the one that
    has read the whole sequence; ``output[:, -1]`` would give it after one step)."""
    if bidirectional:
        return torch.cat([h_n[-2], h_n[-1]], dim=-1)
    return h_n[-1]


def _check_sequence_input(model: nn.Module, x: torch.Tensor, input_size: int) -> None:
    if x.dim() != 3 or x.shape[-1] != input_size:
        raise ValueError(
            f"{type(model).__name__}: expected input of shape (batch, steps, {input_size}), got {list(x.shape)}"
        )


class _RecurrentClassifier(nn.Module):
    def _encoder_output_size(self) -> int:
        return self.encoder.hidden_size * (2 if self.encoder.bidirectional else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sequence_input(self, x, self.encoder.input_size)
        _, h_n = self.encoder(x)
        if isinstance(h_n, tuple):  # LSTM: (h_n, c_n)
            h_n = h_n[0]
        return self.fc(_last_step(h_n, self.encoder.bidirectional))


class RNNClassifier(_RecurrentClassifier):
    """Elman RNN encoder (``fastlayers.nn.RNN``, batch first) and a linear layer on the
    last step's output (both directions' when bidirectional)."""

    def __init__(
        self,
        input_size: int = 10,
        num_classes: int = 10,
        hidden_size: int = 50,
        num_layers: int = 2,
        nonlinearity: str = "tanh",
        dropout: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = fnn.RNN(
            input_size,
            hidden_size,
            num_layers,
            nonlinearity=nonlinearity,
            dropout=dropout,
            bidirectional=bidirectional,
            batch_first=True,
        )
        self.fc = nn.Linear(self._encoder_output_size(), num_classes)


class LSTMClassifier(_RecurrentClassifier):
    """LSTM encoder (``fastlayers.nn.LSTM``, batch first) and a linear layer on the last
    step's output (both directions' when bidirectional)."""

    def __init__(
        self,
        input_size: int = 10,
        num_classes: int = 10,
        hidden_size: int = 50,
        num_layers: int = 2,
        dropout: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = fnn.LSTM(
            input_size, hidden_size, num_layers, dropout=dropout, bidirectional=bidirectional, batch_first=True
        )
        self.fc = nn.Linear(self._encoder_output_size(), num_classes)


class AttentionClassifier(_RecurrentClassifier):
    """Recurrent encoder, ``LuongAttention`` pooling over all its outputs, linear layer.

    The encoder (``cell='lstm'`` or ``'rnn'``, batch first) yields ``(N, T, H)`` (``2H``
    when bidirectional); ``LuongAttention(score=...)`` with its learned pooling query
    weighs the T steps (score ``'dot'``, ``'general'`` or ``'concat'``) and the context
    vector goes through ``linear(H -> num_classes)``. ``return_weights=True`` in
    ``forward`` also returns the attention weights ``(N, T)``.
    """

    def __init__(
        self,
        input_size: int = 10,
        num_classes: int = 10,
        hidden_size: int = 50,
        num_layers: int = 2,
        score: str = "dot",
        cell: str = "lstm",
        dropout: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        encoders = {"lstm": fnn.LSTM, "rnn": fnn.RNN}
        if cell not in encoders:
            raise ValueError(f"AttentionClassifier: cell must be one of {tuple(encoders)}, got {cell!r}")
        self.encoder = encoders[cell](
            input_size, hidden_size, num_layers, dropout=dropout, bidirectional=bidirectional, batch_first=True
        )
        self.attention = fnn.LuongAttention(self._encoder_output_size(), score=score)
        self.fc = nn.Linear(self._encoder_output_size(), num_classes)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        _check_sequence_input(self, x, self.encoder.input_size)
        outputs, _ = self.encoder(x)
        context, weights = self.attention(outputs)
        logits = self.fc(context)
        return (logits, weights) if return_weights else logits


def _sinusoidal_positions(steps: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """(steps, dim) sine/cosine position code (Vaswani et al. 2017, section 3.5)."""
    position = torch.arange(steps, dtype=like.dtype, device=like.device).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=like.dtype, device=like.device) * (-math.log(10000.0) / dim))
    code = torch.zeros(steps, dim, dtype=like.dtype, device=like.device)
    code[:, 0::2] = torch.sin(position * frequency)
    code[:, 1::2] = torch.cos(position * frequency)
    return code


class _SelfAttentionBlock(nn.Module):
    """Post-norm transformer encoder block on ``fastlayers.nn.MultiheadAttention``:
    ``x = norm1(x + attention(x)); x = norm2(x + feedforward(x))``."""

    def __init__(self, hidden_size: int, num_heads: int, feedforward_size: int, dropout: float) -> None:
        super().__init__()
        self.attention = fnn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.feedforward = nn.Sequential(
            nn.Linear(hidden_size, feedforward_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(feedforward_size, hidden_size),
        )
        self.norm2 = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.dropout(self.feedforward(x)))


class SelfAttentionClassifier(nn.Module):
    """Self-attention sequence classifier.

    ``linear(input_size -> hidden_size)`` plus a sinusoidal position code, ``num_layers``
    transformer encoder blocks (``fastlayers.nn.MultiheadAttention`` with ``num_heads``
    heads, batch first, flash kernel; residual + LayerNorm; feed-forward of
    ``feedforward_size``, default ``2 * hidden_size``), the mean over the steps, and
    ``linear(hidden_size -> num_classes)``.
    """

    def __init__(
        self,
        input_size: int = 10,
        num_classes: int = 10,
        hidden_size: int = 64,
        num_heads: int = 4,
        num_layers: int = 1,
        feedforward_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"SelfAttentionClassifier: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
            )
        if hidden_size % 2:
            raise ValueError(
                f"SelfAttentionClassifier: hidden_size must be even (sine/cosine pairs), got {hidden_size}"
            )
        self.input_size = input_size
        self.projection = nn.Linear(input_size, hidden_size)
        self.blocks = nn.Sequential(
            *(
                _SelfAttentionBlock(hidden_size, num_heads, feedforward_size or 2 * hidden_size, dropout)
                for _ in range(num_layers)
            )
        )
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sequence_input(self, x, self.input_size)
        h = self.projection(x)
        h = h + _sinusoidal_positions(h.shape[1], h.shape[2], h)
        return self.fc(self.blocks(h).mean(dim=1))


MODELS: dict[str, type[nn.Module]] = {
    "cnn": CNN,
    "rnn": RNNClassifier,
    "lstm": LSTMClassifier,
    "attention": AttentionClassifier,
    "selfattention": SelfAttentionClassifier,
}


def build(name: str, **kwargs) -> nn.Module:
    """``MODELS[name](**kwargs)``; a ValueError naming the known models for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
