"""fastlayers.models: shapes, the seed's sizes, training steps, and parity with twins
written here on torch.nn layers (same state_dict keys, weights loaded across)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlayers
from fastlayers import models
from fastlayers import nn as fnn


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- twins on torch.nn layers ------------------------------------------------------


class NativeCNN(nn.Module):
    """The seed's CNN on torch.nn layers, laid out as fastlayers' CNN."""

    def __init__(self, in_channels=3, image_size=32, num_classes=10, channels=(32, 64), hidden_size=128):
        super().__init__()
        layers = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[-1] * side * side, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class NativeRecurrent(nn.Module):
    """torch.nn.LSTM/RNN + linear on each direction's last step, read from the output
    sequence (forward half at step T-1, backward half at step 0)."""

    def __init__(self, cls, input_size, num_classes, hidden_size, num_layers, bidirectional, **kwargs):
        super().__init__()
        self.encoder = cls(input_size, hidden_size, num_layers, bidirectional=bidirectional, batch_first=True, **kwargs)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x):
        out, _ = self.encoder(x)
        h = self.encoder.hidden_size
        last = torch.cat([out[:, -1, :h], out[:, 0, h:]], dim=-1) if self.encoder.bidirectional else out[:, -1]
        return self.fc(last)


class NativeLuongPool(nn.Module):
    """Luong pooling with the learned query in plain torch ops (same parameter names)."""

    def __init__(self, hidden_size, score):
        super().__init__()
        self.score = score
        self.pool_query = nn.Parameter(torch.empty(hidden_size))
        if score == "general":
            self.linear = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, outputs):
        keys = self.linear(outputs) if self.score == "general" else outputs  # q^T W k_t
        weights = torch.softmax(keys @ self.pool_query, dim=1)  # (B, T)
        return (weights.unsqueeze(-1) * outputs).sum(1), weights


class NativeAttention(nn.Module):
    def __init__(self, input_size, num_classes, hidden_size, num_layers, score):
        super().__init__()
        self.encoder = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.attention = NativeLuongPool(hidden_size, score)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x):
        outputs, _ = self.encoder(x)
        return self.fc(self.attention(outputs)[0])


def _native_self_attention(model: models.SelfAttentionClassifier) -> nn.Module:
    """A deep copy of `model` whose attention layers are torch.nn.MultiheadAttention."""
    import copy

    twin = copy.deepcopy(model)
    for block in twin.blocks:
        ours = block.attention
        block.attention = nn.MultiheadAttention(
            ours.embed_dim, ours.num_heads, dropout=ours.dropout, batch_first=True, dtype=ours.in_proj_weight.dtype
        )
        block.attention.load_state_dict(ours.state_dict())
    return twin


def _load_and_compare(ours: nn.Module, native: nn.Module, x: torch.Tensor) -> None:
    """native.load_state_dict(ours) is strict (same keys and shapes); then the outputs
    and every parameter's gradient agree in float64."""
    ours, native = ours.double(), native.double()
    native.load_state_dict(ours.state_dict())
    x = x.double()
    out, ref = ours(x), native(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    ref.square().sum().backward()
    grads = dict(native.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(
            p.grad, grads[name].grad, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}"
        )


# ---- CNN ---------------------------------------------------------------------------


def test_cnn_defaults_are_the_seed_network():
    model = models.CNN()
    # conv(3->32, 3x3) + conv(32->64, 3x3) + linear(64*8*8 -> 128) + linear(128 -> 10)
    assert _count(model) == (3 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 8 * 8 * 128 + 128) + (128 * 10 + 10)
    assert all(isinstance(m, fnn.Conv2dReLUMaxPool2d) for m in model.features[::3])
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)


@pytest.mark.parametrize(
    "kwargs, image_shape",
    [
        ({"in_channels": 1, "image_size": 8, "num_classes": 10}, (1, 8, 8)),  # sklearn digits
        ({"in_channels": 1, "image_size": 28, "num_classes": 7, "channels": (4, 6), "hidden_size": 16}, (1, 28, 28)),
        ({"in_channels": 2, "image_size": 12, "num_classes": 3, "channels": (5,), "hidden_size": 9}, (2, 12, 12)),
        ({"in_channels": 3, "image_size": 16, "num_classes": 4, "channels": (4, 4, 8), "hidden_size": 8}, (3, 16, 16)),
    ],
)
def test_cnn_matches_its_torch_twin_for_any_configuration(kwargs, image_shape):
    model = models.CNN(**kwargs)
    native = NativeCNN(**kwargs)
    assert _count(model) == _count(native)
    x = torch.randn(3, *image_shape)
    assert model(x).shape == (3, kwargs["num_classes"])
    _load_and_compare(model, native, x)


@pytest.mark.parametrize("image_size", [30, 0, -4])
def test_cnn_rejects_an_image_size_its_pools_cannot_halve(image_size):
    with pytest.raises(ValueError, match=f"image_size must be a positive multiple of 4.*got {image_size}"):
        models.CNN(image_size=image_size)


def test_cnn_with_three_blocks_needs_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        models.CNN(image_size=12, channels=(4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        models.CNN(channels=())


# ---- recurrent classifiers ---------------------------------------------------------


@pytest.mark.parametrize("cls, native", [(models.RNNClassifier, nn.RNN), (models.LSTMClassifier, nn.LSTM)])
def test_recurrent_defaults_are_the_seed_network(cls, native):
    model = cls()
    twin = native(10, 50, 2, batch_first=True)
    assert _count(model) == _count(twin) + 50 * 10 + 10
    assert model.encoder.batch_first and model.encoder.hidden_size == 50 and model.encoder.num_layers == 2
    assert model(torch.randn(4, 20, 10)).shape == (4, 10)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize(
    "cls, native, extra",
    [
        (models.LSTMClassifier, nn.LSTM, {}),
        (models.RNNClassifier, nn.RNN, {"nonlinearity": "tanh"}),
        (models.RNNClassifier, nn.RNN, {"nonlinearity": "relu"}),
    ],
)
def test_recurrent_classifier_matches_torch_on_the_last_step(cls, native, extra, num_layers, bidirectional):
    sizes = {"input_size": 3, "num_classes": 4, "hidden_size": 6, "num_layers": num_layers}
    model = cls(**sizes, bidirectional=bidirectional, **extra)
    twin = NativeRecurrent(native, **sizes, bidirectional=bidirectional, **extra)
    _load_and_compare(model, twin, torch.randn(5, 7, 3))


def test_recurrent_dropout_is_active_in_training_only():
    model = models.LSTMClassifier(input_size=3, num_classes=2, hidden_size=8, num_layers=2, dropout=0.5)
    x = torch.randn(4, 5, 3)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_rnn_classifier_rejects_an_unknown_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity"):
        models.RNNClassifier(nonlinearity="gelu")


# ---- attention classifiers ---------------------------------------------------------


@pytest.mark.parametrize("score", ["dot", "general"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_attention_classifier_matches_lstm_plus_luong_pooling_in_torch(score, num_layers):
    sizes = {"input_size": 3, "num_classes": 4, "hidden_size": 6, "num_layers": num_layers}
    model = models.AttentionClassifier(**sizes, score=score)
    twin = NativeAttention(**sizes, score=score)
    assert _count(model) == _count(twin)
    _load_and_compare(model, twin, torch.randn(5, 9, 3))


def test_attention_classifier_weights_are_a_distribution_over_the_steps():
    model = models.AttentionClassifier(input_size=2, num_classes=3, hidden_size=8, score="general")
    logits, weights = model(torch.randn(4, 11, 2), return_weights=True)
    assert logits.shape == (4, 3) and weights.shape == (4, 11)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))


@pytest.mark.parametrize("cell, encoder", [("lstm", fnn.LSTM), ("rnn", fnn.RNN)])
def test_attention_classifier_bidirectional_encoders(cell, encoder):
    model = models.AttentionClassifier(input_size=2, num_classes=3, hidden_size=5, cell=cell, bidirectional=True)
    assert type(model.encoder) is encoder
    assert model.attention.hidden_size == 10 and model.fc.in_features == 10
    assert model(torch.randn(3, 7, 2)).shape == (3, 3)


def test_attention_classifier_rejects_unknown_cell_and_score():
    with pytest.raises(ValueError, match="cell must be one of"):
        models.AttentionClassifier(cell="gru")
    with pytest.raises(ValueError, match="score must be one of"):
        models.AttentionClassifier(score="cosine")


@pytest.mark.parametrize("num_layers", [1, 2])
def test_self_attention_classifier_matches_torch_multihead_attention(num_layers):
    model = models.SelfAttentionClassifier(
        input_size=3, num_classes=4, hidden_size=8, num_heads=2, num_layers=num_layers
    )
    twin = _native_self_attention(model)
    assert type(twin.blocks[0].attention) is nn.MultiheadAttention
    _load_and_compare(model, twin, torch.randn(5, 9, 3))


def test_self_attention_classifier_sees_the_order_of_the_steps():
    # Without the position code, attention + mean pooling would be permutation invariant.
    model = models.SelfAttentionClassifier(input_size=2, num_classes=3, hidden_size=8, num_heads=2).eval()
    x = torch.randn(2, 10, 2)
    assert not torch.allclose(model(x), model(x.flip(1)), atol=1e-4)


def test_self_attention_classifier_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be divisible by num_heads \(4\)"):
        models.SelfAttentionClassifier(hidden_size=10, num_heads=4)


@pytest.mark.parametrize("name", ["rnn", "lstm", "attention", "selfattention"])
def test_sequence_models_name_the_expected_input_shape(name):
    model = models.build(name, input_size=4)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, steps, 4\), got \[8, 4\]"):
        model(torch.randn(8, 4))


# ---- all models: registry, training, dtype ------------------------------------------


def _sample(name):
    if name == "cnn":
        return models.build(name, in_channels=1, image_size=8, num_classes=3, channels=(4, 8), hidden_size=16), (
            torch.randn(6, 1, 8, 8)
        )
    return models.build(name, input_size=2, num_classes=3, hidden_size=8), torch.randn(6, 5, 2)


def test_registry_names_every_model():
    assert models.MODELS == {
        "cnn": models.CNN,
        "rnn": models.RNNClassifier,
        "lstm": models.LSTMClassifier,
        "attention": models.AttentionClassifier,
        "selfattention": models.SelfAttentionClassifier,
    }
    assert fastlayers.models is models


def test_build_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="unknown model 'gru'; known models: cnn, rnn, lstm, attention, selfattention"):
        models.build("gru")
    with pytest.raises(TypeError, match="hidden"):
        models.build("cnn", hidden=3)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_a_few_training_steps_lower_the_loss(name):
    model, x = _sample(name)
    y = torch.arange(6) % 3
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", list(models.MODELS))
def test_models_run_in_float64(name):
    model, x = _sample(name)
    model = model.double()
    out = model(x.double())
    assert out.dtype == torch.float64 and out.shape == (6, 3)
