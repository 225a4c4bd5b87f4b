"""Fused LSTM / Elman RNN: the cell and layer ops, fastlayers.functional and the
drop-in fastlayers.nn.LSTM / RNN / LSTMCell / RNNCell against their torch.nn twins."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastlayers
import fastlayers.nn as fnn
from fastlayers.functional import lstm_cell, rnn_relu_cell, rnn_tanh_cell
from fastlayers.ops.rnn import (
    lstm_cell_reference,
    lstm_layer_reference,
    rnn_cell_reference,
    rnn_layer_reference,
)
from helpers import (
    CPU_DTYPES,
    TOLERANCES,
    assert_close_to_oracle,
    assert_no_worse_than_torch,
    devices,
    requires_cuda_kernels,
    requires_extension,
)

pytestmark = requires_extension

# Gradients pass through 2 GEMMs per step and the recurrence: allow float32 a little
# more than one rounding per element.
GRAD_TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-5, 5e-6)}


def _flatten(out):
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [out]


def _assert_same(ours, theirs, dtype, what=""):
    rtol, atol = GRAD_TOLERANCES[dtype]
    for a, b in zip(_flatten(ours), _flatten(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}\n{m}")


def _run_and_grad(module, inputs):
    """Output of module(*inputs) and the gradients of sum(all outputs) w.r.t. the
    parameters and the float inputs that require grad."""
    out = module(*inputs)
    loss = sum(t.sum() for t in _flatten(out))
    leaves = [p for p in module.parameters()] + [t for t in _flatten(inputs) if t.requires_grad]
    return out, torch.autograd.grad(loss, leaves)


def _pair(torch_module, ours_cls):
    ours = ours_cls.from_torch(torch_module)
    assert type(ours) is ours_cls
    return ours


# ---- cells: modules against torch.nn ---------------------------------------------------


CELL_CASES = list(itertools.product([torch.float32, torch.float64], [1, 5], [True, False], [True, False], [True, False]))


@pytest.mark.parametrize("dtype,batch,with_hx,batched,bias", CELL_CASES)
def test_lstm_cell_matches_torch_lstm_cell(dtype, batch, with_hx, batched, bias):
    native = torch.nn.LSTMCell(6, 7, bias=bias, dtype=dtype)
    ours = _pair(native, fnn.LSTMCell)
    shape = (batch, 6) if batched else (6,)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    hx = None
    if with_hx:
        state = (batch, 7) if batched else (7,)
        hx = (torch.randn(state, dtype=dtype, requires_grad=True), torch.randn(state, dtype=dtype, requires_grad=True))
    inputs = (x,) if hx is None else (x, hx)
    _assert_same(_run_and_grad(ours, inputs), _run_and_grad(native, inputs), dtype)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("dtype,batch,with_hx,batched,bias", CELL_CASES)
def test_rnn_cell_matches_torch_rnn_cell(nonlinearity, dtype, batch, with_hx, batched, bias):
    native = torch.nn.RNNCell(6, 7, bias=bias, nonlinearity=nonlinearity, dtype=dtype)
    ours = _pair(native, fnn.RNNCell)
    x = torch.randn((batch, 6) if batched else (6,), dtype=dtype, requires_grad=True)
    inputs = (x, torch.randn((batch, 7) if batched else (7,), dtype=dtype, requires_grad=True)) if with_hx else (x,)
    _assert_same(_run_and_grad(ours, inputs), _run_and_grad(native, inputs), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh", "rnn_relu"])
def test_cell_ops_match_float64_oracle_and_are_no_worse_than_torch(cpu_isa, cell, dtype):
    batch, input_size, hidden = 9, 13, 37  # odd sizes: vector remainders in every ISA
    gates = 4 if cell == "lstm" else 1
    x, h, c = (2 * torch.randn(batch, n, dtype=torch.float64) for n in (input_size, hidden, hidden))
    w_ih, w_hh = torch.randn(gates * hidden, input_size, dtype=torch.float64) / 3, torch.randn(
        gates * hidden, hidden, dtype=torch.float64
    ) / 5
    b_ih, b_hh = torch.randn(gates * hidden, dtype=torch.float64), torch.randn(gates * hidden, dtype=torch.float64)
    args64 = (x, h, c, w_ih, w_hh, b_ih, b_hh)
    args = tuple(t.to(dtype) for t in args64)
    if cell == "lstm":
        ours = lstm_cell(args[0], (args[1], args[2]), *args[3:])
        oracle = lstm_cell_reference(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        native = torch._VF.lstm_cell(args[0], (args[1], args[2]), *args[3:])
    else:
        fn, native_fn = (rnn_tanh_cell, torch._VF.rnn_tanh_cell) if cell == "rnn_tanh" else (
            rnn_relu_cell,
            torch._VF.rnn_relu_cell,
        )
        ours = (fn(args[0], args[1], *args[3:]),)
        oracle = (rnn_cell_reference(x, h, w_ih, w_hh, b_ih, b_hh, cell[4:]),)
        native = (native_fn(args[0], args[1], *args[3:]),)
    for o, r, n in zip(ours, oracle, native):
        assert o.dtype == dtype
        if dtype in (torch.float32, torch.float64):
            assert_close_to_oracle(o, r, dtype)
        else:
            assert_no_worse_than_torch(o, n, r, floor=TOLERANCES[dtype][1])


# (steps, batch, input_size, hidden): a thin input (the transposed GEMM orientation),
# a wide one, steps * batch > 256 (the weight-gradient GEMMs split k into chunks),
# batches that leave partial 6-row tiles (7, 9 and 13 rows end in two balanced tiles),
# hidden sizes that leave partial panels, and gate rows 1 KB apart or more (H = 70 in
# float32, H >= 32 in float64), whose weight gradients take the transposed product (its
# result transposed back; at I + H + 1 = 261 its A operand is transposed first, too).
LAYER_GEMM_SHAPES = [(40, 7, 3, 37), (5, 13, 70, 20), (3, 1, 33, 9), (6, 9, 5, 16), (4, 5, 6, 70), (2, 3, 190, 70)]


def _contractive_layer_args(kind, shape):
    """float64 layer-op arguments for `kind` ("lstm", "lstm_proj" or "rnn_tanh") of
    LAYER_GEMM_SHAPES' `shape`, requiring grad, with w_hh scaled to a contractive
    recurrence: rounding differences must not grow chaotically over 40 steps."""
    steps, batch, input_size, hidden = shape
    if kind == "lstm_proj":
        args = _projected_lstm_args(steps=steps, batch=batch, input_size=input_size, hidden=hidden, proj=hidden // 2)
    else:
        args = _op_args(kind, True, requires_grad=True, steps=steps, batch=batch, input_size=input_size, hidden=hidden)
    with torch.no_grad():
        args[3 if kind == "rnn_tanh" else 4].mul_(2 / hidden**0.5)
    return args


@pytest.mark.parametrize("shape", LAYER_GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "rnn_tanh"])
def test_float32_layer_ops_match_float64_oracle_on_every_cpu_isa(cpu_isa, kind, shape):
    args64 = _contractive_layer_args(kind, shape)
    kind = "lstm" if kind == "lstm_proj" else kind
    args32 = [a.detach().float().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args64]
    results = []
    for args in (args32, args64):
        out = _differentiable_outputs(kind, _op(kind, True))(*args)
        out = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(5)
        grads_out = [torch.randn(o.shape, dtype=torch.float64).to(o.dtype) for o in out]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        results.append((out, torch.autograd.grad(out, tensors, grads_out)))
    for ours, oracle in zip(_flatten(results[0]), _flatten(results[1]), strict=True):
        # float32 sums over up to steps * batch = 280 products: a few ulp of the magnitudes.
        scale = oracle.abs().max().item()
        torch.testing.assert_close(ours.double(), oracle, rtol=1e-5, atol=2e-6 * max(1.0, scale))


@pytest.mark.parametrize("shape", LAYER_GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "rnn_tanh"])
def test_float64_layer_ops_match_the_reference_on_every_cpu_isa(cpu_isa, kind, shape):
    # The float64 GEMM micro-kernel and float64 exp/tanh against the pure-PyTorch
    # reference (ATen's float64 GEMMs, torch's tanh/sigmoid), forward and every gradient.
    args = _contractive_layer_args(kind, shape)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if kind == "rnn_tanh":
        ours, reference = _op(kind, True), rnn_layer_reference
    else:
        ours, reference = _differentiable_outputs("lstm", _op("lstm", True)), lstm_layer_reference
    results = []
    for fn in (ours, reference):
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(5)
        grads_out = [torch.randn_like(o) for o in out]
        results.append((out, torch.autograd.grad(out, tensors, grads_out)))
    for got, want in zip(_flatten(results[0]), _flatten(results[1]), strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13 * max(1.0, scale))


def test_cell_modules_take_torch_parameters_and_initialisation():
    for make_native, ours_cls, kwargs in [
        (torch.nn.LSTMCell, fnn.LSTMCell, dict(bias=False)),
        (torch.nn.RNNCell, fnn.RNNCell, dict(nonlinearity="relu")),
        (torch.nn.LSTM, fnn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3)),
        (torch.nn.RNN, fnn.RNN, dict(num_layers=2, nonlinearity="relu", batch_first=True, dropout=0.25)),
    ]:
        torch.manual_seed(3)
        native = make_native(4, 5, **kwargs)
        torch.manual_seed(3)
        ours = ours_cls(4, 5, **kwargs)
        assert repr(ours) == repr(native)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [
            (n, p.shape) for n, p in native.named_parameters()
        ]
        for a, b in zip(ours.parameters(), native.parameters()):
            assert torch.equal(a, b), "same seed, same initialisation"
        # state_dict both ways
        other = make_native(4, 5, **kwargs)
        other.load_state_dict(ours.state_dict())
        ours.load_state_dict(make_native(4, 5, **kwargs).state_dict())


# ---- layers: modules against torch.nn -------------------------------------------------------

LSTM_CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=1, bias=False, batch_first=True),
    dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
    dict(num_layers=2, proj_size=3),
    dict(num_layers=2, proj_size=3, bidirectional=True, batch_first=True),
]


def _config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items())


def _layer_inputs(native, dtype, steps, batch, batched, with_hx, is_lstm):
    shape = [steps, 6]
    if batched:
        shape.insert(0 if native.batch_first else 1, batch)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    if not with_hx:
        return (x,)
    layers = native.num_layers * (2 if native.bidirectional else 1)
    real_hidden = native.proj_size if getattr(native, "proj_size", 0) else native.hidden_size
    h_shape = [layers, batch, real_hidden] if batched else [layers, real_hidden]
    h = torch.randn(h_shape, dtype=dtype, requires_grad=True)
    if not is_lstm:
        return (x, h)
    c_shape = [layers, batch, native.hidden_size] if batched else [layers, native.hidden_size]
    return (x, (h, torch.randn(c_shape, dtype=dtype, requires_grad=True)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched,with_hx", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("config", LSTM_CONFIGS, ids=_config_id)
def test_lstm_matches_torch_lstm(config, batched, with_hx, dtype):
    native = torch.nn.LSTM(6, 5, dtype=dtype, **config)
    ours = _pair(native, fnn.LSTM)
    inputs = _layer_inputs(native, dtype, steps=7, batch=3, batched=batched, with_hx=with_hx, is_lstm=True)
    _assert_same(_run_and_grad(ours, inputs), _run_and_grad(native, inputs), dtype)


RNN_CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, nonlinearity="relu"),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(num_layers=1, bidirectional=True, bias=False, nonlinearity="relu"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched,with_hx", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("config", RNN_CONFIGS, ids=_config_id)
def test_rnn_matches_torch_rnn(config, batched, with_hx, dtype):
    native = torch.nn.RNN(6, 5, dtype=dtype, **config)
    ours = _pair(native, fnn.RNN)
    inputs = _layer_inputs(native, dtype, steps=7, batch=3, batched=batched, with_hx=with_hx, is_lstm=False)
    _assert_same(_run_and_grad(ours, inputs), _run_and_grad(native, inputs), dtype)


@pytest.mark.parametrize("batch,steps", [(1, 1), (1, 9), (4, 1), (0, 3)])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_layers_match_torch_with_batch_one_an_empty_batch_and_a_single_step(kind, batch, steps):
    native = (torch.nn.LSTM if kind == "lstm" else torch.nn.RNN)(6, 5, num_layers=2, dtype=torch.float64)
    ours = _pair(native, fnn.LSTM if kind == "lstm" else fnn.RNN)
    inputs = _layer_inputs(native, torch.float64, steps, batch, batched=True, with_hx=True, is_lstm=kind == "lstm")
    _assert_same(_run_and_grad(ours, inputs), _run_and_grad(native, inputs), torch.float64)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_layers_match_torch_over_a_long_sequence(kind):
    native = (torch.nn.LSTM if kind == "lstm" else torch.nn.RNN)(3, 8, dtype=torch.float64)
    ours = _pair(native, fnn.LSTM if kind == "lstm" else fnn.RNN)
    x = torch.randn(600, 2, 3, dtype=torch.float64, requires_grad=True)
    _assert_same(_run_and_grad(ours, (x,)), _run_and_grad(native, (x,)), torch.float64)


PACKED_CONFIGS = [
    ("lstm", dict(num_layers=2)),
    ("lstm", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("lstm", dict(num_layers=1, bidirectional=True, proj_size=3)),
    ("rnn", dict(num_layers=2, bidirectional=True, nonlinearity="relu")),
    ("rnn", dict(num_layers=1, batch_first=True, bias=False)),
]


@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("kind,config", PACKED_CONFIGS, ids=[f"{k}-{_config_id(c)}" for k, c in PACKED_CONFIGS])
def test_layers_match_torch_with_packed_uneven_lengths(kind, config, with_hx):
    dtype = torch.float64
    native = (torch.nn.LSTM if kind == "lstm" else torch.nn.RNN)(6, 5, dtype=dtype, **config)
    ours = _pair(native, fnn.LSTM if kind == "lstm" else fnn.RNN)
    lengths = torch.tensor([3, 8, 1, 8, 5])  # unsorted, with ties and a length-1 sequence
    padded = torch.randn(5, 8, 6, dtype=dtype)
    inputs = _layer_inputs(native, dtype, steps=8, batch=5, batched=True, with_hx=with_hx, is_lstm=kind == "lstm")
    leaf = padded.requires_grad_()

    def pack():
        padded_input = leaf if native.batch_first else leaf.transpose(0, 1)
        return pack_padded_sequence(padded_input, lengths, batch_first=native.batch_first, enforce_sorted=False)

    args = (pack(), *inputs[1:])
    (out_ours, h_ours), grads_ours = _run_and_grad(ours, args)
    (out_native, h_native), grads_native = _run_and_grad(native, args)
    assert isinstance(out_ours, PackedSequence)
    assert torch.equal(out_ours.batch_sizes, out_native.batch_sizes)
    assert torch.equal(out_ours.unsorted_indices, out_native.unsorted_indices)
    _assert_same((out_ours, h_ours, grads_ours), (out_native, h_native, grads_native), dtype)
    grad_ours = torch.autograd.grad(pad_packed_sequence(ours(pack())[0])[0].sum(), leaf)[0]
    grad_native = torch.autograd.grad(pad_packed_sequence(native(pack())[0])[0].sum(), leaf)[0]
    _assert_same(grad_ours, grad_native, dtype)


def _autograd_node_names(tensor):
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_packed_input_runs_the_layer_op_once_per_direction(kind):
    module = (fnn.LSTM if kind == "lstm" else fnn.RNN)(6, 5, bidirectional=True)
    packed = pack_padded_sequence(torch.randn(9, 4, 6, requires_grad=True), torch.tensor([9, 6, 6, 2]))
    names = _autograd_node_names(module(packed)[0].data)
    layer_nodes = [n for n in names if f"fastlayers_{kind}_layer" in n]
    assert layer_nodes and not any("_cell" in n for n in names)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_dropout_between_layers_in_training_matches_torch_for_the_same_seed(kind):
    native = (torch.nn.LSTM if kind == "lstm" else torch.nn.RNN)(6, 5, num_layers=3, dropout=0.4, dtype=torch.float64)
    ours = _pair(native, fnn.LSTM if kind == "lstm" else fnn.RNN)
    x = torch.randn(7, 3, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out_native = _run_and_grad(native, (x,))
    torch.manual_seed(11)
    out_ours = _run_and_grad(ours, (x,))
    _assert_same(out_ours, out_native, torch.float64)
    # Dropout is active: in training the output differs from the deterministic eval output.
    assert not torch.allclose(out_ours[0][0], ours.eval()(x)[0])
    _assert_same(ours(x), native.eval()(x), torch.float64)


@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh", "rnn_relu"])
def test_functional_layers_match_torch_vf_with_the_same_arguments(kind):
    dtype = torch.float64
    if kind == "lstm":
        native = torch.nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True, dtype=dtype)
        hx = (torch.randn(4, 3, 5, dtype=dtype), torch.randn(4, 3, 5, dtype=dtype))
    else:
        native = torch.nn.RNN(6, 5, num_layers=2, bidirectional=True, batch_first=True, nonlinearity=kind[4:], dtype=dtype)
        hx = torch.randn(4, 3, 5, dtype=dtype)
    x = torch.randn(3, 7, 6, dtype=dtype)
    args = (x, hx, native._flat_weights, True, 2, 0.0, False, True, True)
    if kind == "lstm":
        ours, expected = fastlayers.functional.lstm(*args), torch._VF.lstm(*args)
    else:
        ours = fastlayers.functional.rnn(*args, nonlinearity=kind[4:])
        expected = getattr(torch._VF, kind)(*args)
    _assert_same(ours, expected, dtype)


def test_reference_backend_runs_the_reference_and_gives_the_same_results():
    lstm = fnn.LSTM(6, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    cell = fnn.RNNCell(6, 5, nonlinearity="relu", dtype=torch.float64)
    x = torch.randn(7, 3, 6, dtype=torch.float64, requires_grad=True)
    single = fnn.LSTM(6, 5, dtype=torch.float64)
    assert "fastlayers_lstm_layer" in type(single(x)[0].grad_fn).__name__
    assert "fastlayers_rnn_cell" in type(cell(x[0]).grad_fn).__name__
    kernels = _run_and_grad(lstm, (x,)), _run_and_grad(cell, (x[0],))
    with fastlayers.use_backend("reference"):
        assert "fastlayers" not in type(single(x)[0].grad_fn).__name__
        assert "fastlayers" not in type(cell(x[0]).grad_fn).__name__
        reference = _run_and_grad(lstm, (x,)), _run_and_grad(cell, (x[0],))
    _assert_same(kernels, reference, torch.float64)


# ---- the ops: gradcheck, opcheck, compile ---------------------------------------------------


def _op_args(kind, layer, bias=True, dtype=torch.float64, requires_grad=True, steps=3, batch=2, input_size=3, hidden=4):
    gates = 4 if kind == "lstm" else 1
    x = torch.randn(*((steps,) if layer else ()), batch, input_size, dtype=dtype)
    h, c = torch.randn(batch, hidden, dtype=dtype), torch.randn(batch, hidden, dtype=dtype)
    w_ih = torch.randn(gates * hidden, input_size, dtype=dtype) / 2
    w_hh = torch.randn(gates * hidden, hidden, dtype=dtype) / 2
    b_ih = torch.randn(gates * hidden, dtype=dtype) if bias else None
    b_hh = torch.randn(gates * hidden, dtype=dtype) if bias else None
    tensors = [x, h] + ([c] if kind == "lstm" else []) + [w_ih, w_hh, b_ih, b_hh]
    tensors = [t.requires_grad_(requires_grad) if t is not None else None for t in tensors]
    return tensors if kind == "lstm" else tensors + [kind[4:]]


def _op(kind, layer):
    name = ("lstm" if kind == "lstm" else "rnn") + ("_layer" if layer else "_cell")
    return getattr(torch.ops.fastlayers, name).default


def _differentiable_outputs(kind, op):
    if kind == "lstm":
        return lambda *a: op(*a)[:2]
    return op


OP_CASES = [(k, layer) for k in ("lstm", "rnn_tanh", "rnn_relu") for layer in (False, True)]
OP_IDS = [f"{k}-{'layer' if layer else 'cell'}" for k, layer in OP_CASES]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind,layer", OP_CASES, ids=OP_IDS)
def test_gradcheck_float64(kind, layer, bias):
    args = _op_args(kind, layer, bias)
    torch.autograd.gradcheck(_differentiable_outputs(kind, _op(kind, layer)), tuple(args))


@pytest.mark.parametrize("kind,layer", OP_CASES, ids=OP_IDS)
def test_gradgradcheck_float64(kind, layer):
    args = _op_args(kind, layer, steps=2)
    torch.autograd.gradgradcheck(_differentiable_outputs(kind, _op(kind, layer)), tuple(args))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind,layer", OP_CASES, ids=OP_IDS)
def test_opcheck(kind, layer, bias):
    args = _op_args(kind, layer, bias, dtype=torch.float32)
    torch.library.opcheck(_op(kind, layer), tuple(args))


@pytest.mark.parametrize("kind,layer", OP_CASES, ids=OP_IDS)
def test_opcheck_backward_ops(kind, layer):
    args = _op_args(kind, layer, dtype=torch.float32, requires_grad=False)
    out = _op(kind, layer)(*args)
    if kind == "lstm":
        x, h, c, w_ih, w_hh = args[:5]
        output, cells, gates = out
        grads = (torch.randn_like(output), torch.randn_like(cells))
        if layer:
            backward_args = (*grads, x, h, c, w_ih, w_hh, output, cells, gates, True)
            op = torch.ops.fastlayers.lstm_layer_backward.default
        else:
            backward_args = (*grads, x, h, c, w_ih, w_hh, gates, cells, True)
            op = torch.ops.fastlayers.lstm_cell_backward.default
    else:
        x, h, w_ih, w_hh = args[:4]
        name = "rnn_layer_backward" if layer else "rnn_cell_backward"
        backward_args = (torch.randn_like(out), x, h, w_ih, w_hh, out, False, kind[4:])
        op = getattr(torch.ops.fastlayers, name).default
    torch.library.opcheck(op, backward_args)


def _projected_lstm_args(dtype=torch.float64, steps=4, batch=3, input_size=5, hidden=6, proj=3, bias=True):
    x = torch.randn(steps, batch, input_size, dtype=dtype)
    h, c = torch.randn(batch, proj, dtype=dtype), torch.randn(batch, hidden, dtype=dtype)
    w_ih = torch.randn(4 * hidden, input_size, dtype=dtype) / 2
    w_hh = torch.randn(4 * hidden, proj, dtype=dtype) / 2
    b_ih = torch.randn(4 * hidden, dtype=dtype) if bias else None
    b_hh = torch.randn(4 * hidden, dtype=dtype) if bias else None
    w_hr = torch.randn(proj, hidden, dtype=dtype) / 2
    return [t.requires_grad_() if t is not None else None for t in (x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)]


@pytest.mark.parametrize("input_grad,weight_grad", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh"])
def test_layer_backward_ops_compute_only_the_gradients_asked_for(kind, input_grad, weight_grad):
    args = _op_args(kind, True, dtype=torch.float32, requires_grad=False)
    out = _op(kind, True)(*args)
    if kind == "lstm":
        x, h, c, w_ih, w_hh = args[:5]
        output, cells, gates = out
        common = (torch.randn_like(output), torch.randn_like(cells), x, h, c, w_ih, w_hh, output, cells, gates, True)
        op, layout = torch.ops.fastlayers.lstm_layer_backward.default, (None, None, False)
        weight_slots = (3, 4, 5, 6)
    else:
        x, h, w_ih, w_hh = args[:4]
        common = (torch.randn_like(out), x, h, w_ih, w_hh, out, True, "tanh")
        op, layout = torch.ops.fastlayers.rnn_layer_backward.default, (None, False)
        weight_slots = (2, 3, 4)
    full = op(*common, *layout)
    part = op(*common, *layout, input_grad, weight_grad)
    for i, (want, got) in enumerate(zip(full, part)):
        skipped = (i == 0 and not input_grad) or (i in weight_slots and not weight_grad)
        if skipped:
            assert got.shape == (0,), f"output {i} was computed"
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(op, (*common, *layout, input_grad, weight_grad))


@pytest.mark.parametrize("frozen", ["input", "weights", "all_but_a_bias"])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_modules_match_torch_with_frozen_inputs_or_weights(kind, frozen):
    # The layer backward then leaves out the gradients autograd does not ask for.
    native = (torch.nn.LSTM if kind == "lstm" else torch.nn.RNN)(6, 5, num_layers=2, dtype=torch.float64)
    ours = _pair(native, fnn.LSTM if kind == "lstm" else fnn.RNN)
    x = torch.randn(7, 3, 6, dtype=torch.float64, requires_grad=frozen != "input")
    for module in (native, ours):
        for name, p in module.named_parameters():
            p.requires_grad_(frozen == "input" or (frozen == "all_but_a_bias" and name == "bias_hh_l1"))
    grads = []
    for module in (native, ours):
        output, _ = module(x)
        wrt = [t for t in (x, *module.parameters()) if t.requires_grad]
        grads.append(torch.autograd.grad(output.pow(2).sum(), wrt))
    assert len(grads[0]) == len(grads[1]) > 0
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bias", [True, False])
def test_projected_lstm_layer_op_gradcheck_and_opcheck(bias):
    args = _projected_lstm_args(bias=bias)
    layer = torch.ops.fastlayers.lstm_layer.default
    torch.autograd.gradcheck(lambda *a: layer(*a)[:2], tuple(args))
    torch.autograd.gradgradcheck(lambda *a: layer(*a)[:2], tuple(args))
    torch.library.opcheck(layer, tuple(a.detach().float().requires_grad_() if a is not None else None for a in args))


def test_projected_lstm_layer_op_matches_reference_and_backward_op_passes_opcheck():
    args = [a.detach() if a is not None else None for a in _projected_lstm_args()]
    output, cells, gates = torch.ops.fastlayers.lstm_layer(*args)
    ref_output, ref_cells = lstm_layer_reference(*args)
    assert output.shape == (4, 3, 3) and cells.shape == (4, 3, 6)
    assert_close_to_oracle(output, ref_output, torch.float64)
    assert_close_to_oracle(cells, ref_cells, torch.float64)
    x, h, c, w_ih, w_hh, _, _, w_hr = args
    grads = (torch.randn_like(output), torch.randn_like(cells))
    torch.library.opcheck(
        torch.ops.fastlayers.lstm_layer_backward.default,
        (*grads, x, h, c, w_ih, w_hh, output, cells, gates, True, w_hr),
    )


def test_projected_lstm_module_runs_the_layer_op():
    module = fnn.LSTM(6, 5, proj_size=2)
    assert "fastlayers_lstm_layer" in type(module(torch.randn(4, 3, 6))[0].grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_op_accepts_transposed_weights_and_strided_biases(dtype):
    steps, batch, input_size, hidden = 5, 3, 4, 6
    args = [
        torch.randn(steps, batch, input_size, dtype=dtype),
        torch.randn(batch, hidden, dtype=dtype),
        torch.randn(batch, hidden, dtype=dtype),
        torch.randn(input_size, 4 * hidden, dtype=dtype).t(),
        torch.randn(hidden, 4 * hidden, dtype=dtype).t(),
        torch.randn(8 * hidden, dtype=dtype)[::2],
        torch.randn(4 * hidden, dtype=dtype),
    ]
    ours = [a.detach().requires_grad_() for a in args]
    theirs = [a.detach().requires_grad_() for a in args]
    output, cells, _ = torch.ops.fastlayers.lstm_layer(*ours)
    ref_output, ref_cells = lstm_layer_reference(*theirs)
    grads = torch.autograd.grad(output.sum() + cells.sum(), ours)
    ref_grads = torch.autograd.grad(ref_output.sum() + ref_cells.sum(), theirs)
    _assert_same((output, cells, grads), (ref_output, ref_cells, ref_grads), dtype)


def test_layer_ops_match_their_references():
    for kind in ("lstm", "rnn_tanh", "rnn_relu"):
        args = _op_args(kind, True, requires_grad=False, steps=5, batch=3)
        if kind == "lstm":
            output, cells, gates = _op(kind, True)(*args)
            ref_output, ref_cells = lstm_layer_reference(*args)
            assert_close_to_oracle(cells, ref_cells, torch.float64)
            # The saved gates are the activated i, f, g, o: in [0, 1] or [-1, 1].
            i, f, g, o = gates.chunk(4, -1)
            assert all(((t >= 0) & (t <= 1)).all() for t in (i, f, o)) and (g.abs() <= 1).all()
        else:
            output = _op(kind, True)(*args)
            ref_output = rnn_layer_reference(*args)
        assert_close_to_oracle(output, ref_output, torch.float64)


def _packed_layer_args(kind, lengths, reverse, hidden=4, dtype=torch.float64, requires_grad=False):
    """Layer op arguments for packed data holding sequences of `lengths` (decreasing);
    weights scaled by 1 / sqrt(hidden) keep the recurrence contractive."""
    batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(lengths[0])])
    args = _op_args(kind, True, dtype=dtype, requires_grad=False, batch=len(lengths), hidden=hidden)
    args[0] = torch.randn(sum(lengths), args[0].shape[-1], dtype=dtype)
    weights = 3 if kind == "lstm" else 2
    args[weights : weights + 2] = [w / hidden**0.5 for w in args[weights : weights + 2]]
    args = [a.requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    return args + ([None] if kind == "lstm" else []) + [batch_sizes, reverse]


def _layer_reference(kind):
    return lstm_layer_reference if kind == "lstm" else rnn_layer_reference


# Sequence lengths of packed batches: uneven with ties, all equal, one sequence, and
# (hidden 96) a batch the CPU loop splits between threads by summed length.
PACKED_LENGTHS = [([5, 3, 3, 1], 4), ([4, 4, 4], 4), ([3], 4), ([23, 17, 9, 9, 4, 2, 1, 1], 96)]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths,hidden", PACKED_LENGTHS, ids=[f"{l}-H{h}" for l, h in PACKED_LENGTHS])
@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh", "rnn_relu"])
def test_packed_and_reverse_layer_ops_match_the_reference(kind, lengths, hidden, reverse):
    args = _packed_layer_args(kind, lengths, reverse, hidden=hidden, requires_grad=True)
    ours = _op(kind, True)(*args)
    ours = ours[:2] if kind == "lstm" else (ours,)
    expected = _layer_reference(kind)(*args)
    expected = expected if kind == "lstm" else (expected,)
    assert ours[0].shape == (sum(lengths), hidden)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grad_outputs = [torch.randn_like(o) for o in ours]
    grads = torch.autograd.grad(ours, leaves, grad_outputs)
    expected_grads = torch.autograd.grad(expected, leaves, grad_outputs)
    _assert_same((ours, grads), (expected, expected_grads), torch.float64)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh"])
def test_packed_batch_of_equal_lengths_matches_the_time_major_layer_op(kind, reverse):
    args = _packed_layer_args(kind, [6, 6, 6], reverse)
    packed = _op(kind, True)(*args)
    args_time_major = [args[0].view(6, 3, -1), *args[1:-2], None, reverse]
    time_major = _op(kind, True)(*args_time_major)
    packed, time_major = (packed[:2], time_major[:2]) if kind == "lstm" else ((packed,), (time_major,))
    for p, t in zip(packed, time_major):
        torch.testing.assert_close(p, t.reshape(p.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh"])
def test_packed_layer_ops_gradcheck_and_opcheck(kind, reverse):
    args = _packed_layer_args(kind, [4, 2, 2, 1], reverse, requires_grad=True)
    torch.autograd.gradcheck(_differentiable_outputs(kind, _op(kind, True)), tuple(args))
    torch.library.opcheck(_op(kind, True), tuple(args))
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out = _op(kind, True)(*args)
    batch_sizes = args[-2]
    if kind == "lstm":
        x, h, c, w_ih, w_hh = args[:5]
        output, cells, gates = out
        backward_args = (torch.randn_like(output), torch.randn_like(cells), x, h, c, w_ih, w_hh, output, cells, gates,
                         True, None, batch_sizes, reverse)
        torch.library.opcheck(torch.ops.fastlayers.lstm_layer_backward.default, backward_args)
    else:
        x, h, w_ih, w_hh = args[:4]
        backward_args = (torch.randn_like(out), x, h, w_ih, w_hh, out, True, "tanh", batch_sizes, reverse)
        torch.library.opcheck(torch.ops.fastlayers.rnn_layer_backward.default, backward_args)


def _packed_rnn_call(data, batch_sizes, batch=2):
    weights = [torch.randn(5, data.shape[-1]), torch.randn(5, 5)]
    return lambda: fastlayers.functional.rnn(data, torch.randn(1, batch, 5), weights, False, 1, 0.0, False, False,
                                             False, batch_sizes=batch_sizes)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize(
    "call,match",
    [
        (_packed_rnn_call(torch.randn(3, 4), torch.tensor([1, 2]), batch=1), "positive and non-increasing"),
        (_packed_rnn_call(torch.randn(3, 4), torch.tensor([2, 0, 1])), "positive and non-increasing"),
        (_packed_rnn_call(torch.randn(3, 4), torch.tensor([2, 2])), "batch_sizes sum to 4 but the packed input has 3"),
        (_packed_rnn_call(torch.randn(3, 4), torch.tensor([2, 1], dtype=torch.int32)), "non-empty 1-D int64 CPU"),
        (_packed_rnn_call(torch.randn(3, 4), torch.tensor([], dtype=torch.int64)), "non-empty 1-D int64 CPU"),
        (_packed_rnn_call(torch.randn(2, 2, 4), torch.tensor([2, 2])), r"input must be 2-D packed data"),
        (_packed_rnn_call(torch.randn(3, 4), torch.tensor([2, 1]), batch=3), "Input batch size"),
    ],
)
def test_bad_packed_layer_arguments_raise_clear_errors_on_every_backend(backend, call, match):
    with fastlayers.use_backend(backend), pytest.raises(RuntimeError, match=match):
        call()


class _Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fnn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = fnn.LSTMCell(16, 4)
        self.rnn = fnn.RNN(4, 3, nonlinearity="relu")

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        hy, cy = self.cell(out[:, -1])
        r, _ = self.rnn(hy.unsqueeze(0))
        return r.sum() + h.sum() + c.sum()


def test_torch_compile_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = _Tagger()
    x = torch.randn(3, 5, 6)
    eager = model(x)
    grads_eager = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    result = compiled(x)
    grads_compiled = torch.autograd.grad(result, list(model.parameters()))
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(grads_compiled, grads_eager)


def test_compiled_graph_calls_the_fastlayers_ops():
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    model = _Tagger()
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(3, 5, 6))
    for op in ("lstm_layer", "lstm_cell", "rnn_layer"):
        assert f"fastlayers.{op}.default" in seen


# ---- errors ------------------------------------------------------------------------------------


def _bad_cell_calls():
    x, h = torch.randn(3, 4), torch.randn(3, 5)
    w_ih, w_hh = torch.randn(20, 4), torch.randn(20, 5)
    return [
        ("input size", lambda f: f(torch.randn(3, 6), (h, h), w_ih, w_hh)),
        ("hidden0 batch", lambda f: f(x, (torch.randn(2, 5), h), w_ih, w_hh)),
        ("hidden0 size", lambda f: f(x, (torch.randn(3, 6), h), w_ih, w_hh)),
        ("hidden1 size", lambda f: f(x, (h, torch.randn(3, 6)), w_ih, w_hh)),
    ]


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("case", range(4))
def test_lstm_cell_shape_errors_are_torchs(backend, case):
    what, call = _bad_cell_calls()[case]
    with pytest.raises(RuntimeError) as native:
        call(torch._VF.lstm_cell)
    with fastlayers.use_backend(backend), pytest.raises(RuntimeError) as ours:
        call(lstm_cell)
    assert str(ours.value) == str(native.value), what


@pytest.mark.parametrize(
    "make,call",
    [
        (lambda: torch.nn.LSTMCell(4, 5), lambda m: m(torch.randn(2, 3, 4))),
        (lambda: torch.nn.LSTMCell(4, 5), lambda m: m(torch.randn(3, 6))),
        (lambda: torch.nn.LSTMCell(4, 5), lambda m: m(torch.randn(3, 4), (torch.randn(2, 5), torch.randn(3, 5)))),
        (lambda: torch.nn.LSTMCell(4, 5), lambda m: m(torch.randn(3, 4), (torch.randn(1, 3, 5), torch.randn(3, 5)))),
        (lambda: torch.nn.RNNCell(4, 5), lambda m: m(torch.randn(3, 4), torch.randn(3, 7))),
        (lambda: torch.nn.RNNCell(4, 5), lambda m: m(torch.randn(3, 4), torch.randn(1, 3, 5))),
        (lambda: torch.nn.LSTM(4, 5), lambda m: m(torch.randn(2, 3, 4, 1))),
        (lambda: torch.nn.LSTM(4, 5), lambda m: m(torch.randn(7, 3, 6))),
        (lambda: torch.nn.LSTM(4, 5), lambda m: m(torch.randn(7, 3, 4), (torch.randn(1, 2, 5), torch.randn(1, 3, 5)))),
        (lambda: torch.nn.LSTM(4, 5), lambda m: m(torch.randn(7, 3, 4), (torch.randn(3, 5), torch.randn(3, 5)))),
        (lambda: torch.nn.LSTM(4, 5, proj_size=2), lambda m: m(torch.randn(7, 4), (torch.randn(1, 5), torch.randn(1, 5)))),
        (lambda: torch.nn.LSTM(4, 5), lambda m: m(torch.randn(7, 3, 4, dtype=torch.float64))),
        (lambda: torch.nn.RNN(4, 5), lambda m: m(torch.randn(7, 3, 4), torch.randn(2, 3, 5))),
        (lambda: torch.nn.RNN(4, 5), lambda m: m(torch.randn(7, 4), torch.randn(1, 3, 5))),
    ],
)
def test_modules_reject_what_torch_rejects_with_the_same_error(make, call):
    native = make()
    ours = {
        torch.nn.LSTMCell: fnn.LSTMCell,
        torch.nn.RNNCell: fnn.RNNCell,
        torch.nn.LSTM: fnn.LSTM,
        torch.nn.RNN: fnn.RNN,
    }[type(native)].from_torch(native)
    with pytest.raises(Exception) as expected:
        call(native)
    with pytest.raises(type(expected.value)) as got:
        call(ours)
    assert str(got.value) == str(expected.value)


def test_constructor_errors_match_torch():
    for kwargs in [dict(nonlinearity="gelu"), dict(proj_size=2)]:
        with pytest.raises(ValueError) as expected:
            torch.nn.RNN(4, 5, **kwargs)
        with pytest.raises(ValueError) as got:
            fnn.RNN(4, 5, **kwargs)
        assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        fnn.LSTM(4, 5, proj_size=5)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: lstm_cell(torch.randn(3, 4), (torch.randn(3, 5),) * 2, torch.randn(20, 4), torch.randn(20, 4)),
         RuntimeError, r"w_hh must have shape \[4 \* hidden_size, hidden_size\]"),
        (lambda: lstm_cell(torch.randn(3, 4), (torch.randn(3, 5),) * 2, torch.randn(16, 4), torch.randn(20, 5)),
         RuntimeError, r"w_ih must have shape \[20, input_size\]"),
        (lambda: rnn_tanh_cell(torch.randn(3, 4), torch.randn(3, 5), torch.randn(5, 4), torch.randn(5, 5),
                               torch.randn(4)), RuntimeError, r"b_ih must have shape \[5\]"),
        (lambda: rnn_tanh_cell(torch.randn(3, 4), torch.randn(3, 5).double(), torch.randn(5, 4), torch.randn(5, 5)),
         TypeError, "hidden0 dtype torch.float64 does not match input dtype torch.float32"),
        (lambda: rnn_relu_cell(torch.randn(3, 4).int(), torch.randn(3, 5), torch.randn(5, 4), torch.randn(5, 5)),
         TypeError, "input must be float32, float64, float16 or bfloat16"),
        (lambda: rnn_relu_cell(torch.randn(2, 3, 4), torch.randn(3, 5), torch.randn(5, 4), torch.randn(5, 5)),
         RuntimeError, r"input must be 2-D \[batch, input_size\]"),
    ],
)
def test_bad_arguments_raise_clear_errors_on_every_backend(backend, call, error, match):
    with fastlayers.use_backend(backend), pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: torch.ops.fastlayers.rnn_layer(torch.randn(3, 2, 4), torch.randn(2, 5), torch.randn(5, 4),
                                                torch.randn(5, 5), None, None, "gelu"),
         ValueError, "unknown nonlinearity 'gelu'"),
        (lambda: torch.ops.fastlayers.lstm_layer(torch.randn(0, 2, 4), torch.randn(2, 5), torch.randn(2, 5),
                                                 torch.randn(20, 4), torch.randn(20, 5), None, None),
         RuntimeError, "at least one time step"),
        (lambda: torch.ops.fastlayers.lstm_layer(torch.randn(2, 4), torch.randn(2, 5), torch.randn(2, 5),
                                                 torch.randn(20, 4), torch.randn(20, 5), None, None),
         RuntimeError, r"input must be 3-D \[seq_len, batch, input_size\]"),
        (lambda: torch.ops.fastlayers.lstm_layer_backward(
            torch.randn(3, 2, 4), torch.randn(3, 2, 5), torch.randn(3, 2, 4), torch.randn(2, 5), torch.randn(2, 5),
            torch.randn(20, 4), torch.randn(20, 5), torch.randn(3, 2, 5), torch.randn(3, 2, 5), torch.randn(3, 2, 20),
            True),
         RuntimeError, r"grad_output must have shape \[3, 2, 5\]"),
    ],
)
def test_op_entries_check_their_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- CUDA (skips without a GPU) ----------------------------------------------------------------


CUDA_LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@requires_cuda_kernels
@pytest.mark.parametrize("dtype", CUDA_LOW_PRECISION + [torch.float64])
@pytest.mark.parametrize("kind,layer", OP_CASES, ids=OP_IDS)
def test_cuda_ops_match_float64_oracle_and_are_no_worse_than_torch(kind, layer, dtype):
    args64 = _op_args(kind, layer, requires_grad=False, steps=6, batch=5, input_size=24, hidden=40)
    args64 = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args64]
    args = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args64]
    ours, oracle = _op(kind, layer)(*args), _op(kind, layer)(*args64)
    ours, oracle = (ours[:2], oracle[:2]) if kind == "lstm" else ((ours,), (oracle,))
    if kind == "lstm":
        native = (
            lstm_layer_reference(*args) if layer else lstm_cell_reference(args[0], (args[1], args[2]), *args[3:])
        )
    else:
        ref = rnn_layer_reference if layer else rnn_cell_reference
        native = (ref(*args),)
    for o, r, n in zip(ours, oracle, native):
        if dtype == torch.float64:
            assert_close_to_oracle(o, r, dtype)
        else:
            assert_no_worse_than_torch(o, n, r, floor=TOLERANCES[dtype][1])


@pytest.mark.cuda
@requires_cuda_kernels
@pytest.mark.parametrize("kind,layer", OP_CASES, ids=OP_IDS)
def test_cuda_gradcheck_and_opcheck(kind, layer):
    args = [a.cuda().detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in _op_args(kind, layer)]
    torch.autograd.gradcheck(_differentiable_outputs(kind, _op(kind, layer)), tuple(args))
    torch.library.opcheck(_op(kind, layer), tuple(args))


@pytest.mark.cuda
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_modules_match_torch_on_every_device(kind, device):
    native = (torch.nn.LSTM if kind == "lstm" else torch.nn.RNN)(
        6, 5, num_layers=2, bidirectional=True, dtype=torch.float64, device=device
    )
    ours = _pair(native, fnn.LSTM if kind == "lstm" else fnn.RNN)
    x = torch.randn(7, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    _assert_same(_run_and_grad(ours, (x,)), _run_and_grad(native, (x,)), torch.float64)
