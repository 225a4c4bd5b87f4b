"""fastlayers.convert / fastlayers.revert: same outputs and gradients, same parameters
(objects, not copies), hooks, modes, dtypes; fusion only where exact; round trips."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.utils.prune
from torch import nn
from torch.nn import functional as F

import fastlayers
from fastlayers import models
from fastlayers import nn as fnn
from helpers import devices

FASTLAYERS_LAYERS = (
    fnn.Conv1d,
    fnn.Conv2d,
    fnn.Conv2dReLU,
    fnn.Conv2dReLUMaxPool2d,
    fnn.LSTM,
    fnn.RNN,
    fnn.LSTMCell,
    fnn.RNNCell,
    fnn.MultiheadAttention,
)
TORCH_LAYERS = (nn.Conv1d, nn.Conv2d, nn.LSTM, nn.RNN, nn.LSTMCell, nn.RNNCell, nn.MultiheadAttention)


def _types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def _no_torch_layers_left(model: nn.Module) -> bool:
    return not any(type(m) in TORCH_LAYERS for m in model.modules())


def _no_fastlayers_left(model: nn.Module) -> bool:
    return not any(isinstance(m, FASTLAYERS_LAYERS) for m in model.modules())


def _assert_same_function(ours: nn.Module, native: nn.Module, x: torch.Tensor, rtol=1e-5, atol=1e-6) -> None:
    """Outputs, input gradient and every parameter's gradient agree (parameters matched
    by name: the two models must have the same state_dict layout)."""
    ours.zero_grad(set_to_none=True)
    native.zero_grad(set_to_none=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = ours(x1), native(x2)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=atol)
    grads = dict(native.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(
            p.grad, grads[name].grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- the documented models ----------------------------------------------------------

SMALL = {
    "cnn": ({"in_channels": 1, "image_size": 8, "num_classes": 3, "channels": (4, 8), "hidden_size": 16}, (4, 1, 8, 8)),
    "rnn": ({"input_size": 3, "num_classes": 3, "hidden_size": 8, "bidirectional": True}, (4, 6, 3)),
    "lstm": ({"input_size": 3, "num_classes": 3, "hidden_size": 8}, (4, 6, 3)),
    "attention": ({"input_size": 3, "num_classes": 3, "hidden_size": 8, "score": "general"}, (4, 6, 3)),
    "selfattention": ({"input_size": 3, "num_classes": 3, "hidden_size": 8, "num_heads": 2}, (4, 6, 3)),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_revert_gives_the_torch_twin_and_convert_brings_the_model_back(name):
    kwargs, shape = SMALL[name]
    model = models.build(name, **kwargs)
    native = fastlayers.revert(copy.deepcopy(model))
    assert _no_fastlayers_left(native)
    _assert_same_state(native, model)  # same keys and values
    x = torch.randn(shape)
    _assert_same_function(model, native, x)

    back = fastlayers.convert(copy.deepcopy(native), fuse=True)
    assert _types(back) == _types(model)  # the fused blocks included
    _assert_same_state(back, model)
    _assert_same_function(back, native, x)


class SeedCNN(nn.Module):
    """The seed's CNN listing: torch.nn layers, functional ReLU, one shared pool."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class SeedLSTM(nn.Module):
    def __init__(self, cls=nn.LSTM):
        super().__init__()
        self.rnn = cls(10, 50, 2, batch_first=True)
        self.fc = nn.Linear(50, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize(
    "make, shape", [(SeedCNN, (2, 3, 32, 32)), (SeedLSTM, (3, 20, 10)), (lambda: SeedLSTM(nn.RNN), (3, 20, 10))]
)
def test_seed_listings_written_on_torch_nn_convert_exactly(make, shape):
    native = make()
    ours = fastlayers.convert(copy.deepcopy(native), fuse=True)  # nothing to fuse: no Sequential
    assert _no_torch_layers_left(ours)
    _assert_same_state(ours, native)
    _assert_same_function(ours, native, torch.randn(shape), rtol=1e-4, atol=1e-5)


# ---- models the rest of the suite never uses ----------------------------------------


class Mixed(nn.Module):
    """Conv1d front end, a conv stack in nested containers, recurrent layers in a
    ModuleDict, a cell loop, a transformer encoder layer and cross-attention."""

    def __init__(self):
        super().__init__()
        self.front = nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect")
        self.image = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
                nn.Sequential(nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, bias=False), nn.ReLU()), nn.Flatten()),
            ]
        )
        self.recurrent = nn.ModuleDict(
            {
                "lstm": nn.LSTM(6, 5, 2, batch_first=True, bidirectional=True, proj_size=3),
                "rnn": nn.RNN(6, 4, nonlinearity="relu"),
            }
        )
        self.cell = nn.LSTMCell(6, 4)
        self.rnn_cell = nn.RNNCell(4, 4, nonlinearity="tanh")
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.to_model = nn.Linear(6 + 4 + 4, 8)
        self.cross = nn.MultiheadAttention(8, 2, kdim=2, vdim=2, add_bias_kv=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, T=8, 4)
        seq = self.front(x.transpose(1, 2)).transpose(1, 2)  # (B, T, 6)
        image = x.unsqueeze(1).repeat(1, 1, 1, 2)  # (B, 1, 8, 8)
        for block in self.image:
            image = block(image)  # (B, 3, 4, 4), then (B, 2) after the stride-2 conv
        lstm_out, _ = self.recurrent["lstm"](seq)  # (B, T, 6)
        rnn_out, h = self.recurrent["rnn"](seq.transpose(0, 1))  # time first
        c = h.new_zeros(x.shape[0], 4)
        hx = (c, c)
        for t in range(seq.shape[1]):
            hx = self.cell(seq[:, t], hx)
        r = self.rnn_cell(hx[0])
        tokens = self.to_model(torch.cat([lstm_out, rnn_out.transpose(0, 1), hx[0].unsqueeze(1).expand(-1, 8, -1)], -1))
        tokens = self.encoder(tokens + r.sum(-1, keepdim=True).unsqueeze(1))
        memory = image.view(-1, 1, 2).expand(-1, 3, -1).transpose(0, 1)  # (S=3, B, kdim=2)
        attended, _ = self.cross(tokens.transpose(0, 1), memory, memory)
        return self.head(attended.mean(0))


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, (1e-4, 1e-5)), (torch.float64, (1e-10, 1e-12))])
def test_a_mixed_model_converts_to_the_same_function(fuse, dtype, tolerance):
    native = Mixed().to(dtype)
    ours = fastlayers.convert(copy.deepcopy(native), fuse=fuse)
    assert _no_torch_layers_left(ours)
    assert type(ours.encoder.self_attn) is fnn.MultiheadAttention and type(ours.cross) is fnn.MultiheadAttention
    assert all(p.dtype == dtype for p in ours.parameters())
    first = ours.image[0]
    if fuse:
        assert [type(m) for m in first] == [fnn.Conv2dReLUMaxPool2d, nn.Identity, nn.Identity]
        assert [type(m) for m in ours.image[1][0]] == [fnn.Conv2dReLU, nn.Identity]
    else:
        assert [type(m) for m in first] == [fnn.Conv2d, nn.ReLU, nn.MaxPool2d]
    _assert_same_state(ours, native)
    _assert_same_function(ours, native, torch.randn(3, 8, 4, dtype=dtype), *tolerance)

    fastlayers.revert(ours)
    assert _types(ours) == _types(native)
    _assert_same_state(ours, native)


def test_a_transformer_built_from_torch_nn_converts():
    native = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32, dropout=0.0)
    ours = fastlayers.convert(copy.deepcopy(native))
    assert sum(type(m) is fnn.MultiheadAttention for m in ours.modules()) == 4  # 2 + self and cross
    src, tgt = torch.randn(7, 2, 16), torch.randn(5, 2, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    torch.testing.assert_close(ours(src, tgt, tgt_mask=mask), native(src, tgt, tgt_mask=mask), rtol=1e-4, atol=1e-5)


# ---- fusion --------------------------------------------------------------------------


def _conv(c_in=2, c_out=3, **kwargs):
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


@pytest.mark.parametrize(
    "layers, fused_types",
    [
        ([_conv(), nn.ReLU(), nn.MaxPool2d(2)], [fnn.Conv2dReLUMaxPool2d, nn.Identity, nn.Identity]),
        (
            [_conv(), nn.ReLU(inplace=True), nn.MaxPool2d((2, 2), stride=2, padding=0)],
            [fnn.Conv2dReLUMaxPool2d, nn.Identity, nn.Identity],
        ),
        (
            [_conv(padding_mode="circular"), nn.ReLU(), nn.MaxPool2d(2)],
            [fnn.Conv2dReLUMaxPool2d, nn.Identity, nn.Identity],
        ),
        ([_conv(), nn.ReLU()], [fnn.Conv2dReLU, nn.Identity]),
        # The pool is not the fused op's 2x2/2 pool: conv + ReLU fuse, the pool stays.
        ([_conv(), nn.ReLU(), nn.MaxPool2d(3)], [fnn.Conv2dReLU, nn.Identity, nn.MaxPool2d]),
        ([_conv(), nn.ReLU(), nn.MaxPool2d(2, stride=1)], [fnn.Conv2dReLU, nn.Identity, nn.MaxPool2d]),
        ([_conv(), nn.ReLU(), nn.MaxPool2d(2, padding=1)], [fnn.Conv2dReLU, nn.Identity, nn.MaxPool2d]),
        ([_conv(), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)], [fnn.Conv2dReLU, nn.Identity, nn.MaxPool2d]),
        ([_conv(), nn.ReLU(), nn.MaxPool2d(2, dilation=2)], [fnn.Conv2dReLU, nn.Identity, nn.MaxPool2d]),
        ([_conv(), nn.ReLU(), nn.AvgPool2d(2)], [fnn.Conv2dReLU, nn.Identity, nn.AvgPool2d]),
        # Not conv -> ReLU: no fusion.
        ([_conv(), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)], [fnn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]),
        ([_conv(), nn.LeakyReLU(), nn.MaxPool2d(2)], [fnn.Conv2d, nn.LeakyReLU, nn.MaxPool2d]),
        ([_conv(), nn.ReLU6()], [fnn.Conv2d, nn.ReLU6]),
        (
            [_conv(), _conv(3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU()],
            [fnn.Conv2d, fnn.Conv2dReLUMaxPool2d, nn.Identity, nn.Identity, nn.ReLU],
        ),
    ],
)
def test_fuse_fuses_only_runs_the_fused_ops_compute_exactly(layers, fused_types):
    native = nn.Sequential(*layers).eval()
    ours = fastlayers.convert(copy.deepcopy(native), fuse=True)
    assert [type(m) for m in ours] == fused_types
    _assert_same_state(ours, native)
    _assert_same_function(ours, native, torch.randn(2, 2, 9, 7), rtol=1e-4, atol=1e-5)  # odd sizes: pool floors

    fastlayers.revert(ours)
    assert _types(ours) == _types(native)
    _assert_same_state(ours, native)
    _assert_same_function(ours, native, torch.randn(2, 2, 9, 7), rtol=1e-5, atol=1e-6)


def test_fuse_leaves_a_run_whose_inner_output_a_hook_reads():
    seen = []
    native = nn.Sequential(_conv(), nn.ReLU(), nn.MaxPool2d(2))
    native[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ours = fastlayers.convert(native, fuse=True)
    assert [type(m) for m in ours] == [fnn.Conv2d, nn.ReLU, nn.MaxPool2d]
    ours(torch.randn(1, 2, 6, 6))
    assert seen == [torch.Size([1, 3, 6, 6])]


def test_fuse_acts_only_inside_sequential_containers():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.pool = _conv(), nn.ReLU(), nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.relu(self.conv(x)))

    ours = fastlayers.convert(Block(), fuse=True)
    assert type(ours.conv) is fnn.Conv2d and type(ours.relu) is nn.ReLU


def test_fusing_an_already_converted_model():
    model = fastlayers.convert(nn.Sequential(_conv(), nn.ReLU(), nn.MaxPool2d(2)))
    assert type(model[0]) is fnn.Conv2d
    fastlayers.convert(model, fuse=True)
    assert [type(m) for m in model] == [fnn.Conv2dReLUMaxPool2d, nn.Identity, nn.Identity]


# ---- what is carried -------------------------------------------------------------------


def test_parameters_are_the_same_objects_and_an_earlier_optimizer_keeps_training():
    torch.manual_seed(1)
    native = Mixed()
    twin = copy.deepcopy(native)
    ids = {name: id(p) for name, p in twin.named_parameters()}
    # SGD with momentum: optimizer state, and no division by tiny gradients (Adam would
    # turn float32 rounding in the gradients of e.g. the key bias, 0 in exact math, into
    # full-size steps).
    opt_native = torch.optim.SGD(native.parameters(), lr=0.05, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 8, 4), torch.tensor([0, 1, 2, 0])

    def step(model, optimizer):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step(native, opt_native)
    step(twin, opt_twin)  # the momentum buffers exist now
    fastlayers.convert(twin, fuse=True)
    assert {name: id(p) for name, p in twin.named_parameters()} == ids
    for _ in range(3):
        step(native, opt_native)
        step(twin, opt_twin)
    for (name, a), b in zip(native.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_hooks_fire_after_convert_and_their_handles_still_remove_them():
    calls = []
    native = nn.Sequential(nn.LSTM(3, 4, batch_first=True))
    conv = nn.Conv1d(3, 3, 1)
    lstm = native[0]
    handles = [
        lstm.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m)))),
        lstm.register_forward_hook(lambda m, args, out: calls.append(("forward", type(m)))),
        conv.register_full_backward_hook(lambda m, gin, gout: calls.append(("backward", type(m)))),
    ]
    model = nn.ModuleDict({"seq": native, "conv": conv})
    fastlayers.convert(model)
    assert type(model["seq"][0]) is fnn.LSTM and type(model["conv"]) is fnn.Conv1d

    x = torch.randn(2, 5, 3, requires_grad=True)
    out, _ = model["seq"](x)
    model["conv"](out[..., :3].transpose(1, 2)).sum().backward()
    assert calls == [("pre", fnn.LSTM), ("forward", fnn.LSTM), ("backward", fnn.Conv1d)]

    for handle in handles:
        handle.remove()
    calls.clear()
    model["conv"](model["seq"](x)[0][..., :3].transpose(1, 2)).sum().backward()
    assert calls == []


def test_state_dict_hooks_and_buffers_the_user_added_come_along():
    conv = nn.Conv2d(2, 2, 1)
    conv.register_buffer("scale", torch.full((1,), 3.0))
    conv.register_buffer("cache", torch.zeros(2), persistent=False)
    conv.register_parameter("gain", nn.Parameter(torch.ones(1)))
    conv._register_state_dict_hook(lambda m, state, prefix, local: state.update({prefix + "tag": torch.ones(1)}))
    conv.register_forward_hook(lambda m, args, out: out * m.gain * m.scale)
    model = fastlayers.convert(nn.Sequential(conv))
    ours = model[0]
    assert type(ours) is fnn.Conv2d and ours.scale is conv.scale and ours.gain is conv.gain
    assert list(model.state_dict()) == ["0.weight", "0.bias", "0.gain", "0.scale", "0.tag"]
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(model(x), F.conv2d(x, conv.weight, conv.bias) * 3.0)


def test_a_layer_missing_a_parameter_its_twin_needs_is_left_with_a_warning():
    conv = nn.Conv2d(2, 2, 1)
    del conv.weight
    conv.weight = torch.ones(2, 2, 1, 1)  # a plain tensor now, not a parameter
    with pytest.warns(UserWarning, match=r"0: torch.nn.Conv2d left unconverted: it has no parameters \['weight'\]"):
        model = fastlayers.convert(nn.Sequential(conv))
    assert model[0] is conv


def test_training_mode_is_kept_per_module():
    model = nn.Sequential(nn.LSTM(2, 3, dropout=0.5, num_layers=2), nn.Conv1d(2, 2, 1), nn.MultiheadAttention(4, 2))
    model.train()
    model[1].eval()
    fastlayers.convert(model)
    assert [m.training for m in model] == [True, False, True] and model.training
    fastlayers.revert(model)
    assert [m.training for m in model] == [True, False, True]


def test_a_module_used_twice_becomes_one_twin():
    shared = nn.LSTM(2, 2)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    fastlayers.convert(model)
    assert type(model["a"]) is fnn.LSTM and model["a"] is model["b"][0]
    fastlayers.revert(model)
    assert type(model["a"]) is nn.LSTM and model["a"] is model["b"][0]


def test_a_layer_passed_directly_is_returned_converted():
    native = nn.RNNCell(3, 4)
    ours = fastlayers.convert(native)
    assert type(ours) is fnn.RNNCell and ours.weight_ih is native.weight_ih
    assert type(fastlayers.revert(ours)) is nn.RNNCell


@pytest.mark.parametrize("device", devices())
def test_convert_keeps_the_device(device):
    native = nn.Sequential(_conv(), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LSTM(12, 4)).to(device)
    ours = fastlayers.convert(copy.deepcopy(native), fuse=True)
    assert all(p.device.type == device for p in ours.parameters())
    x = torch.randn(2, 2, 4, 4, device=device)
    torch.testing.assert_close(ours[:4](x), native[:4](x), rtol=1e-5, atol=1e-6)


# ---- what is left alone -------------------------------------------------------------------


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_subclasses_of_torch_layers_are_left_alone_and_reported(capsys):
    model = nn.Sequential(MyConv(2, 2, 1), nn.ReLU())
    fastlayers.convert(model, fuse=True, verbose=True)
    assert type(model[0]) is MyConv and type(model[1]) is nn.ReLU
    assert "MyConv subclasses a torch.nn layer and may rely on it: left as is" in capsys.readouterr().out


@pytest.mark.parametrize(
    "reparametrize, reason",
    [
        (lambda m: torch.nn.utils.parametrizations.weight_norm(m), "parametrized"),
        (lambda m: torch.nn.utils.parametrizations.spectral_norm(m), "parametrized"),
        (lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5), "L1Unstructured hook"),
    ],
)
def test_reparametrized_layers_are_left_unconverted_with_a_warning(reparametrize, reason):
    conv = reparametrize(nn.Conv2d(2, 3, 3))
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.randn(1, 2, 8, 8)
    before = model(x)
    with pytest.warns(UserWarning, match=f"fastlayers.convert: 0: .*left unconverted: .*{reason}"):
        fastlayers.convert(model, fuse=True)
    assert model[0] is conv and type(model[1]) is nn.ReLU
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_old_style_weight_norm_is_left_unconverted_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old API
        lstm = torch.nn.utils.weight_norm(nn.LSTM(2, 3), "weight_hh_l0")
    model = nn.Sequential(lstm)
    with pytest.warns(UserWarning, match="WeightNorm hook"):
        fastlayers.convert(model)
    assert model[0] is lstm


def test_convert_is_idempotent_and_says_what_it_replaced(capsys):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Sequential(nn.LSTMCell(2, 2)))
    fastlayers.convert(model, fuse=True, verbose=True)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        (
            "fastlayers.convert: 0: torch.nn.Conv2d + torch.nn.ReLU + torch.nn.MaxPool2d (then nn.Identity at 1, 2) "
            "-> fastlayers.nn.Conv2dReLUMaxPool2d"
        ),
        "fastlayers.convert: 3.0: torch.nn.LSTMCell -> fastlayers.nn.LSTMCell",
    ]
    types = _types(model)
    fastlayers.convert(model, fuse=True, verbose=True)
    assert capsys.readouterr().out == "" and _types(model) == types


def test_convert_and_revert_reject_non_modules():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fastlayers.convert(torch.zeros(1))
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fastlayers.revert([nn.Conv2d(1, 1, 1)])


# ---- revert ------------------------------------------------------------------------------


def test_revert_expands_a_fused_block_without_placeholders_into_a_sequential():
    seen = []
    block = fnn.Conv2dReLUMaxPool2d(2, 3, 3, padding=1)
    block.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model = nn.ModuleDict({"block": block})
    x = torch.randn(1, 2, 6, 6)
    before = block(x)
    fastlayers.revert(model)
    reverted = model["block"]
    assert [type(m) for m in reverted] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert reverted[0].weight is block.weight
    assert list(model.state_dict()) == ["block.0.weight", "block.0.bias"]
    torch.testing.assert_close(reverted(x), before)
    assert seen == [torch.Size([1, 3, 3, 3])] * 2  # the hook moved to the Sequential: same output


def test_revert_leaves_luong_attention_and_says_so(capsys):
    model = models.AttentionClassifier(input_size=2, num_classes=2, hidden_size=4)
    fastlayers.revert(model, verbose=True)
    assert type(model.encoder) is nn.LSTM and type(model.attention) is fnn.LuongAttention
    assert "attention: fastlayers.nn.LuongAttention has no torch.nn twin: left as is" in capsys.readouterr().out


def test_revert_of_a_natively_built_fastlayers_model_round_trips():
    model = nn.Sequential(
        fnn.Conv1d(2, 3, 3, dilation=2, groups=1),
        fnn.MultiheadAttention(6, 3, kdim=4, vdim=5, bias=False, batch_first=True),
        fnn.RNN(3, 3, 2, nonlinearity="relu", bidirectional=True, bias=False),
        fnn.LSTM(3, 4, proj_size=2),
        fnn.LSTMCell(3, 2, bias=False),
    )
    state = copy.deepcopy(model.state_dict())
    fastlayers.revert(model)
    assert [type(m) for m in model] == [nn.Conv1d, nn.MultiheadAttention, nn.RNN, nn.LSTM, nn.LSTMCell]
    assert model[1].kdim == 4 and model[1].vdim == 5 and model[1].batch_first and model[1].in_proj_bias is None
    assert model[2].nonlinearity == "relu" and model[2].bidirectional and not model[2].bias
    assert model[3].proj_size == 2 and model[0].dilation == (2,)
    assert all(p.device.type == "cpu" for p in model.parameters())  # built on meta, carried real
    fastlayers.convert(model)
    assert [type(m) for m in model] == [fnn.Conv1d, fnn.MultiheadAttention, fnn.RNN, fnn.LSTM, fnn.LSTMCell]
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
