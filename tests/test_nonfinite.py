"""Non-finite values: NaN and +/-Inf in inputs, weights, biases, hidden states and masks
reach the same output and gradient positions as in native torch (NaN where torch has
NaN, +Inf and -Inf where torch has them, the finite values close); softmax over very
large logits and -inf masks stays finite wherever torch's does. Computed in float64
so that the finite values can be compared tightly."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlayers.nn as fnn
from fastlayers.functional import (
    bias_act,
    conv2d,
    conv2d_relu,
    conv2d_relu_max_pool2d,
    lstm_cell,
    rnn_relu_cell,
    rnn_tanh_cell,
    scaled_dot_product_attention,
)
from helpers import requires_extension

pytestmark = requires_extension

NAN, INF = math.nan, math.inf


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """NaN, +Inf and -Inf at the same positions; finite entries close."""
    assert actual.shape == expected.shape, what
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        mismatch = test(actual) != test(expected)
        assert not mismatch.any(), (
            f"{what}: {name} positions differ at {mismatch.nonzero()[:5].tolist()} "
            f"(ours {actual[mismatch][:5].tolist()}, torch {expected[mismatch][:5].tolist()})"
        )
    finite = torch.isfinite(expected)
    # float64 (most tests) tightly; float32 sums differ from torch's in rounding.
    tol = 1e-9 if expected.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(actual[finite], expected[finite], rtol=tol, atol=tol, msg=lambda m: f"{what}\n{m}")


def _grads(outputs, inputs):
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    total = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)
    return torch.autograd.grad(total, inputs, allow_unused=True)


def assert_forward_and_backward_match(ours, native, inputs, what=""):
    """Outputs and input gradients with torch's non-finite positions, finite entries close."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = ours(*inputs)
    ref = native(*inputs)
    out_t = out if isinstance(out, (tuple, list)) else (out,)
    ref_t = ref if isinstance(ref, (tuple, list)) else (ref,)
    for i, (a, e) in enumerate(zip(out_t, ref_t)):
        assert_same_nonfinite(a, e, f"{what} output {i}")
    for i, (a, e) in enumerate(zip(_grads(out_t, inputs), _grads(ref_t, inputs))):
        if e is None:
            continue
        assert_same_nonfinite(a, e, f"{what} gradient of input {i}")


def _poison(t: torch.Tensor, values, positions) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    for value, pos in zip(values, positions):
        flat[pos % flat.numel()] = value
    return t


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


POISONS = {
    "nan": (NAN,),
    "pos_inf": (INF,),
    "neg_inf": (-INF,),
    "mixed": (NAN, INF, -INF),
}


# ---- bias_act -------------------------------------------------------------------------

_TORCH_ACT = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


@pytest.mark.parametrize("activation", list(_TORCH_ACT))
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("where", ["input", "bias"])
def test_bias_act_propagates_nonfinite_like_torch(activation, poison, where):
    x, b = _rand(2, 5, 3, 4), _rand(5)
    if where == "input":
        x = _poison(x, POISONS[poison], [7, 30, 101])
    else:
        b = _poison(b, POISONS[poison], [1, 3, 4])

    def native(x, b):
        return _TORCH_ACT[activation](x + b.view(1, -1, 1, 1))

    assert_forward_and_backward_match(lambda x, b: bias_act(x, b, activation), native, [x, b], activation)


# ---- convolution ----------------------------------------------------------------------


_CONV_KINDS = [
    ("conv2d", conv2d, F.conv2d),
    ("conv2d_relu", conv2d_relu, lambda *a, **k: F.relu(F.conv2d(*a, **k))),
    ("conv2d_relu_max_pool2d", conv2d_relu_max_pool2d, lambda *a, **k: F.max_pool2d(F.relu(F.conv2d(*a, **k)), 2, 2)),
]


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("where", ["input", "weight", "bias"])
@pytest.mark.parametrize("kind, ours, native", _CONV_KINDS)
@pytest.mark.parametrize("padding, groups", [(0, 1), (1, 2)])
def test_conv_propagates_nonfinite_like_torch(kind, ours, native, where, poison, padding, groups):
    x, w, b = _rand(2, 4, 7, 6), _rand(6, 4 // groups, 3, 3), _rand(6)
    tensors = {"input": x, "weight": w, "bias": b}
    tensors[where] = _poison(tensors[where], POISONS[poison], [5, 23, 40])
    assert_forward_and_backward_match(
        lambda x, w, b: ours(x, w, b, padding=padding, groups=groups),
        lambda x, w, b: native(x, w, b, padding=padding, groups=groups),
        [tensors["input"], tensors["weight"], tensors["bias"]],
        kind,
    )


def test_conv_grad_input_with_nonfinite_weight_stays_finite_where_torch_does():
    # Input pixel (0, 0) with a 3x3 kernel and no padding is reached by tap (0, 0)
    # only; a NaN in tap (2, 2) must not reach its gradient. The grad-input passes
    # multiply that tap by a zero of the padded grad_output; the edge pixels are
    # recomputed without it (torch skips it too).
    x = _rand(1, 1, 5, 5).requires_grad_(True)
    w = _rand(1, 1, 3, 3)
    w[0, 0, 2, 2] = NAN
    (grad,) = torch.autograd.grad(conv2d(x, w).sum(), x)
    (ref,) = torch.autograd.grad(F.conv2d(x, w).sum(), x)
    assert torch.isfinite(ref[0, 0, 0, 0])
    assert_same_nonfinite(grad, ref, "grad_input")


# (stride, padding, dilation, groups): taps landing outside grad_output at every edge,
# stride phases no tap reaches, dilated and non-square kernels, grouped and depthwise.
_EDGE_GEOMETRIES = [
    (1, 0, 1, 1),
    (1, 1, 1, 1),
    (2, 1, 1, 1),
    (2, 2, 2, 2),
    (1, 2, 2, 1),
    (3, 1, 1, 4),
    ((1, 2), (0, 2), (2, 1), 1),
    (1, 1, 1, 4),  # depthwise: 4 input channels, 4 groups
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride, padding, dilation, groups", [g for g in _EDGE_GEOMETRIES if g[3] in (1, 2)])
def test_wide_conv_grad_input_recomputes_the_edges_a_nonfinite_weight_meets(stride, padding, dilation, groups, dtype):
    # 36 input channels (18 or 36 a group): grad-input runs the stride-phase passes over
    # the zero-padded grad_output, then recomputes the edge pixels (EdgeGeometry). Up to 16
    # channels a group the columns pass never meets the padding, so the tests above do not
    # reach this path.
    x = torch.randn(2, 36, 9, 8, dtype=dtype)
    w = torch.randn(6, 36 // groups, 3, 3, dtype=dtype)
    w[1, 0, 2, 2], w[-1, -1, 0, 1] = NAN, INF
    b = torch.randn(6, dtype=dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False):
            assert_forward_and_backward_match(
                lambda x, w, b: conv2d(x, w, b, **args), lambda x, w, b: F.conv2d(x, w, b, **args), [x, w, b], "conv2d"
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["weight", "input"])
@pytest.mark.parametrize("stride, padding, dilation, groups", _EDGE_GEOMETRIES)
@pytest.mark.parametrize("kind, ours, native", _CONV_KINDS)
def test_conv_nonfinite_weight_or_input_reaches_the_gradients_torch_reaches(
    kind, ours, native, stride, padding, dilation, groups, where, dtype
):
    # A NaN and an infinity in the weight reach grad_input only through taps that land
    # inside grad_output; in the input they reach grad_weight only through the output
    # pixels that read them. Positions and finite values as torch's, in both dtypes.
    # Torch's oracle runs without oneDNN: oneDNN's float32 forward also skips the taps
    # that land in the zero padding (0 * NaN), unlike torch's float64 and non-oneDNN
    # paths, which give NaN there as the zero-padding definition does; ours follows
    # the latter in both dtypes (see README). Every torch path skips them in grad_input.
    x = torch.randn(2, 4, 9, 8, dtype=dtype)
    w = torch.randn(8 if groups != 4 else 4, 4 // groups, 3, 3, dtype=dtype)
    if where == "weight":
        w[1, 0, 2, 2], w[-1, -1, 0, 1] = NAN, INF
    else:
        x[0, 1, 0, 0], x[1, 3, 8, 7], x[1, 0, 4, 4] = NAN, INF, -INF
    b = torch.randn(w.shape[0], dtype=dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's flags() warns about TF32 on Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            assert_forward_and_backward_match(
                lambda x, w, b: ours(x, w, b, **args), lambda x, w, b: native(x, w, b, **args), [x, w, b], kind
            )


# ---- LSTM / RNN -----------------------------------------------------------------------


def _cell_weights(gates, i=3, h=4):
    return _rand(gates * h, i), _rand(gates * h, h), _rand(gates * h), _rand(gates * h)


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize(
    "cell, where",
    [(cell, where) for cell in ("lstm", "rnn_tanh", "rnn_relu") for where in ("input", "hx", "cx", "w_ih", "w_hh", "b_ih")
     if cell == "lstm" or where != "cx"],
)
def test_cells_propagate_nonfinite_like_torch(cell, where, poison):
    w_ih, w_hh, b_ih, b_hh = _cell_weights(4 if cell == "lstm" else 1)
    t = {"input": _rand(5, 3), "hx": _rand(5, 4), "cx": _rand(5, 4), "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih}
    t[where] = _poison(t[where], POISONS[poison], [2, 9, 13])
    if cell == "lstm":
        def ours(x, h, c, w_ih, w_hh, b_ih):
            return lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)

        def native(x, h, c, w_ih, w_hh, b_ih):
            return torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)

        inputs = [t[k] for k in ("input", "hx", "cx", "w_ih", "w_hh", "b_ih")]
    else:
        fl = rnn_tanh_cell if cell == "rnn_tanh" else rnn_relu_cell
        vf = torch._VF.rnn_tanh_cell if cell == "rnn_tanh" else torch._VF.rnn_relu_cell

        def ours(x, h, w_ih, w_hh, b_ih):
            return fl(x, h, w_ih, w_hh, b_ih, b_hh)

        def native(x, h, w_ih, w_hh, b_ih):
            return vf(x, h, w_ih, w_hh, b_ih, b_hh)

        inputs = [t[k] for k in ("input", "hx", "w_ih", "w_hh", "b_ih")]
    assert_forward_and_backward_match(ours, native, inputs, cell)


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize(
    "kind, where",
    [(kind, where) for kind in ("lstm", "lstm_proj", "rnn", "rnn_bidirectional")
     for where in ("input", "h0", "c0", "weight_hh_l0") if kind.startswith("lstm") or where != "c0"],
)
def test_layers_propagate_nonfinite_like_torch(kind, where, poison):
    torch.manual_seed(0)
    if kind.startswith("lstm"):
        native = torch.nn.LSTM(3, 4, num_layers=2, proj_size=2 if kind == "lstm_proj" else 0, dtype=torch.float64)
        ours = fnn.LSTM.from_torch(native)
    else:
        native = torch.nn.RNN(3, 4, num_layers=2, bidirectional=kind == "rnn_bidirectional", dtype=torch.float64)
        ours = fnn.RNN.from_torch(native)
    directions = 2 if kind == "rnn_bidirectional" else 1
    x = _rand(6, 2, 3)
    h0 = _rand(2 * directions, 2, 2 if kind == "lstm_proj" else 4)
    c0 = _rand(2, 2, 4)
    tensors = {"input": x, "h0": h0, "c0": c0}
    if where in tensors:
        # One step of one batch row: the other row must stay finite, as in torch.
        tensors[where] = _poison(tensors[where], POISONS[poison], [7, 11, 19])
    else:
        with torch.no_grad():
            for module in (native, ours):
                getattr(module, where).copy_(_poison(getattr(module, where), POISONS[poison], [3, 5, 8]))

    def call(module):
        def run(x, h0, c0):
            out, hidden = module(x, (h0, c0) if kind.startswith("lstm") else h0)
            return (out, *hidden) if isinstance(hidden, tuple) else (out, hidden)

        return run

    assert_forward_and_backward_match(call(ours), call(native), [tensors["input"], tensors["h0"], tensors["c0"]], kind)


# ---- attention ------------------------------------------------------------------------


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize(
    "where, is_causal",
    [("query", False), ("key", False), ("value", False), ("float_mask", False),
     ("query", True), ("key", True), ("value", True)],
)
def test_attention_propagates_nonfinite_like_torch(where, poison, is_causal):
    q, k, v = _rand(2, 2, 5, 4), _rand(2, 2, 6, 4), _rand(2, 2, 6, 3)
    mask = _rand(5, 6) if where == "float_mask" else None
    tensors = {"query": q, "key": k, "value": v, "float_mask": mask}
    # Positions in the first key/query rows: visible to every causal query, so torch's
    # math path and the flash kernel agree (see README on NaN behind the causal mask).
    tensors[where] = _poison(tensors[where], POISONS[poison], [0, 1, 5])
    mask = tensors["float_mask"]

    def ours(q, k, v):
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

    def native(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

    if is_causal and where == "query":
        # Query row 0 sees key 0 only; an infinite query entry can make that one logit
        # -inf (see the test below). Rows 1.. see more keys.
        tensors["query"][..., 0, :] = torch.randn(4, dtype=torch.float64)

    assert_forward_and_backward_match(ours, native, [tensors["query"], tensors["key"], tensors["value"]], where)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [3, 40, 300])
def test_attention_row_with_minus_inf_logit_and_inf_behind_the_causal_mask_matches_torch_fused_kernel(dtype, length):
    # Query row 0 sees key 0 only, whose logit is -inf; key `length - 1`, hidden from it
    # by causality, has a +inf logit. torch's fused CPU kernel (and ours) never scores a
    # hidden key: the row sees only -inf logits and gives 0. torch's math backend adds
    # the causal mask as a -inf bias instead and gives inf + -inf = NaN; SDPA picks it
    # only where the fused kernel does not apply (e.g. head dims that are not a multiple
    # of 8). The README documents the difference.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 2, length, 8, dtype=dtype) for _ in range(3))
    q[0, 0, 0, 0] = INF
    k[0, 0, :, 0] = -1.0
    k[0, 0, length - 1, 0] = 1.0
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        math_backend = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (fused[0, 0, 0] == 0).all() and torch.isnan(math_backend[0, 0, 0]).all()
    assert not torch.isnan(fused).any()  # no other row reaches the inf query entry
    finite = torch.isfinite(fused)
    assert (torch.isfinite(ours) == finite).all()
    torch.testing.assert_close(ours[finite], fused[finite], **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}))
    # Gradients too (float64, assert_same_nonfinite's tolerance) while the sequence fits
    # in one tile of both kernels: beyond that, 0 * inf from the infinite query entry
    # reaches the key gradients of whichever hidden tiles a kernel still computes, which
    # depends on its tile sizes (torch's differs from ours).
    if dtype == torch.float64 and length <= 64:

        def fused_kernel(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        assert_forward_and_backward_match(
            lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True), fused_kernel, [q, k, v], "causal"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_attention_with_huge_logits_stays_finite_like_torch(dtype, scale):
    q = torch.randn(2, 2, 7, 8, dtype=dtype)
    k = torch.randn(2, 2, 9, 8, dtype=dtype)
    v = torch.randn(2, 2, 9, 8, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = scaled_dot_product_attention(q, k, v, scale=scale)
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert torch.isfinite(ref).all()
    assert torch.isfinite(out).all()
    # The softmax is one-hot (up to ties): the output is the value at the largest logit.
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    # dQ and dK are scale * (rounding noise of a one-hot softmax's Jacobian): only their
    # finiteness is comparable. dV = P^T dO is well conditioned.
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and torch.isfinite(r).all()
    torch.testing.assert_close(grads[2], ref_grads[2])


@pytest.mark.parametrize("mask_kind", ["bool", "float_neg_inf"])
def test_fully_masked_rows_give_zero_output_and_gradient_like_torch(mask_kind):
    # README: a query row that sees no key gets output 0 and gradients 0, as torch's SDPA
    # on the CPU (its _safe_softmax); rows with -inf on part of the keys are ordinary.
    q, k, v = _rand(2, 2, 5, 4), _rand(2, 2, 6, 4), _rand(2, 2, 6, 3)
    visible = torch.rand(2, 2, 5, 6) < 0.6
    visible[:, :, :, 0] = True
    visible[0, 1, 2] = False  # fully masked rows
    visible[1, :, 4] = False
    mask = visible if mask_kind == "bool" else torch.zeros(visible.shape, dtype=torch.float64).masked_fill(
        ~visible, -INF)
    assert_forward_and_backward_match(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, attn_mask=mask),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        [q, k, v],
        mask_kind,
    )
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[0, 1, 2] == 0).all() and (out[1, :, 4] == 0).all()


def test_float_mask_with_huge_finite_negatives_stays_finite_like_torch():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.zeros(4, 4)
    mask[:, 1:] = -3e38  # near float32's lowest: exp underflows, no overflow
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref)


def test_multihead_attention_fully_padded_row_matches_torch():
    # README: torch's regular MHA path gives NaN for a fully padded row when the weights are
    # requested and 0 otherwise (SDPA); fastlayers does the same.
    torch.manual_seed(0)
    native = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours = fnn.MultiheadAttention.from_torch(native)
    x = _rand(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1] = True
    for need_weights in (False, True):
        out, weights = ours(x, x, x, key_padding_mask=pad, need_weights=need_weights)
        ref, ref_weights = native(x, x, x, key_padding_mask=pad, need_weights=need_weights)
        assert_same_nonfinite(out, ref, f"need_weights={need_weights}")
        if need_weights:
            assert_same_nonfinite(weights, ref_weights, "weights")


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_attention_all_padding_row_is_zero_and_nan_input_propagates(score):
    torch.manual_seed(0)
    pool = fnn.LuongAttention(4, score=score).double()
    enc = _rand(3, 5, 4)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1] = True
    context, weights = pool(enc, mask=mask)
    assert (context[1] == 0).all() and (weights[1] == 0).all()
    assert torch.isfinite(context).all() and torch.isfinite(weights).all()
    enc[2, 3, 0] = NAN
    context, weights = pool(enc, mask=mask)
    assert torch.isnan(context[2]).any() and torch.isfinite(context[[0, 1]]).all()
