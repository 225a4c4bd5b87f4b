"""Bad input: every public function, module and raw registered op, given a malformed
argument, either gives native torch's result or raises an error at least as clear as
torch's (same exception type, a message naming the argument), before any kernel reads
memory. Inputs torch accepts (zero-size dimensions, non-contiguous, expanded and
channels_last views) must give torch's result.

Each table row is (id, fastlayers call, native torch call or None, regex the fastlayers
message must match). With a native twin, the two outcomes must agree: both return
(close results) or both raise (fastlayers' exception an instance of torch's type). A
raw op has no twin: the row names the exception type it must raise instead.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlayers
import fastlayers.nn as fnn
from fastlayers.functional import (
    bias_act,
    conv1d,
    conv2d,
    conv2d_relu,
    conv2d_relu_max_pool2d,
    lstm_cell,
    rnn_relu_cell,
    rnn_tanh_cell,
    scaled_dot_product_attention,
)
from helpers import requires_cuda_kernels, requires_extension

pytestmark = requires_extension
ops = torch.ops.fastlayers


def _outcome(fn):
    try:
        return fn(), None
    except Exception as error:  # noqa: BLE001 - the outcome is what is compared
        return None, error


def _assert_close_nested(actual, expected):
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    elif isinstance(expected, PackedSequence):
        _assert_close_nested(tuple(actual), tuple(expected))
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_close_nested(a, e)
    else:
        assert actual == expected


def assert_like_torch(ours, native, match: str | None = None) -> None:
    """Same outcome as torch: both return close results, or both raise, ours an
    instance of torch's exception type with a message matching `match`."""
    expected, native_error = _outcome(native)
    actual, error = _outcome(ours)
    if native_error is None:
        assert error is None, f"torch returns a result, fastlayers raised {type(error).__name__}: {error}"
        _assert_close_nested(actual, expected)
        return
    assert error is not None, f"torch raises {type(native_error).__name__}: {native_error}; fastlayers returned"
    assert isinstance(error, type(native_error)), (
        f"torch raises {type(native_error).__name__} ({native_error}), fastlayers {type(error).__name__} ({error})"
    )
    if match is not None:
        assert re.search(match, str(error)), f"message {str(error)!r} does not match {match!r}"


def assert_raises_clearly(call, exception: type, match: str) -> None:
    with pytest.raises(exception, match=match):
        call()


def _run_row(row):
    """row: (id, make, ours, native, expected); make() builds the arguments once, both
    calls get the same ones."""
    _, make, ours, native, expected = row
    args = make()
    if native is not None:
        assert_like_torch(lambda: ours(*args), lambda: native(*args), expected)
    else:
        exception, match = expected
        assert_raises_clearly(lambda: ours(*args), exception, match)


def _rows(table):
    return [pytest.param(row, id=row[0]) for row in table]


# ---- bias_act ----------------------------------------------------------------------

def _bias_act_twin(x, b, activation="relu"):
    acts = {"relu": torch.relu, "tanh": torch.tanh, "identity": lambda z: z}
    return acts[activation](x if b is None else x + b.view([1, -1] + [1] * (x.dim() - 2)))


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


BIAS_ACT = [
    ("bias_wrong_length", tuple, lambda: bias_act(_x(2, 3, 4), _x(4)), None, (RuntimeError, r"bias must have shape \[3\]")),
    ("bias_2d", tuple, lambda: bias_act(_x(2, 3, 4), _x(3, 1)), None, (RuntimeError, r"bias must have shape \[3\]")),
    ("input_1d_with_bias", tuple, lambda: bias_act(_x(3), _x(3)), None, (RuntimeError, r"channel dimension")),
    ("int_input", tuple, lambda: bias_act(torch.ones(2, 3, dtype=torch.long), None), None, (TypeError, r"input must be float")),
    ("bool_input", tuple, lambda: bias_act(torch.ones(2, 3, dtype=torch.bool), None), None, (TypeError, r"input must be")),
    ("complex_input", tuple, lambda: bias_act(_x(2, 3, dtype=torch.cfloat), None), None, (TypeError, r"input must be")),
    ("bias_dtype", tuple, lambda: bias_act(_x(2, 3), _x(3, dtype=torch.float64)), None, (TypeError, r"bias dtype")),
    ("bad_activation", tuple, lambda: bias_act(_x(2, 3), None, "swish"), None, (ValueError, r"unknown activation 'swish'")),
    ("raw_bad_activation", tuple, lambda: ops.bias_act(_x(2, 3), None, "swish"), None, (ValueError, r"unknown activation")),
    ("raw_int", tuple, lambda: ops.bias_act(torch.ones(2, 3, dtype=torch.int32), None, "relu"), None, (TypeError, r"input")),
    ("raw_bias_shape", tuple, lambda: ops.bias_act(_x(2, 3), _x(2), "relu"), None, (RuntimeError, r"bias must have shape")),
    ("raw_backward_grad_shape", tuple,
     lambda: ops.bias_act_backward(_x(2, 4), _x(2, 3), None, "relu"), None, (RuntimeError, r"grad_output has shape")),
    ("raw_backward_grad_dtype", tuple,
     lambda: ops.bias_act_backward(_x(2, 3, dtype=torch.float64), _x(2, 3), None, "relu"), None,
     (TypeError, r"grad_output dtype")),
    ("raw_backward_bias_shape", tuple,
     lambda: ops.bias_act_backward(_x(2, 3), _x(2, 3), _x(4), "tanh"), None, (RuntimeError, r"bias must have shape")),
]


@pytest.mark.parametrize("row", _rows(BIAS_ACT))
def test_bias_act_rejects_bad_input_clearly(row):
    _run_row(row)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: (_x(0, 3, 4, 4), _x(3)), id="zero_batch"),
        pytest.param(lambda: (_x(2, 0, 4), _x(0)), id="zero_channels"),
        pytest.param(lambda: (_x(2, 3, 0, 5), _x(3)), id="zero_height"),
        pytest.param(lambda: (_x(0), None), id="empty_1d_no_bias"),
        pytest.param(lambda: (_x(4, 6, 5).transpose(0, 2), _x(6)), id="transposed"),
        pytest.param(lambda: (_x(1, 3, 4, 4).expand(5, 3, 4, 4), _x(3)), id="expanded"),
        pytest.param(lambda: (_x(2, 3, 4, 4).contiguous(memory_format=torch.channels_last), _x(3)), id="channels_last"),
        pytest.param(lambda: (_x(2, 3, 4, 8)[..., ::2], _x(6)[::2]), id="strided_input_and_bias"),
        pytest.param(lambda: (_x(2, 3), _x(1).expand(3)), id="expanded_bias"),
    ],
)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_bias_act_matches_torch_on_unusual_layouts_and_empty_inputs(make, activation):
    x, b = make()
    x.requires_grad_(True)
    assert_like_torch(lambda: bias_act(x, b, activation), lambda: _bias_act_twin(x, b, activation))
    if x.numel():
        (g,) = torch.autograd.grad(bias_act(x, b, activation).sum(), x)
        (g_ref,) = torch.autograd.grad(_bias_act_twin(x, b, activation).sum(), x)
        torch.testing.assert_close(g, g_ref)


# ---- convolution -------------------------------------------------------------------

X4, W4, B4 = (2, 3, 6, 6), (4, 3, 3, 3), (4,)


def _conv_row(name, args, kwargs=None, match=None):
    """The same call through fastlayers.functional.conv2d and F.conv2d."""
    kwargs = kwargs or {}
    return (name, args, lambda *a: conv2d(*a, **kwargs), lambda *a: F.conv2d(*a, **kwargs), match)


CONV2D = [
    _conv_row("input_2d", lambda: (_x(3, 6), _x(*W4)), match=r"input of size: \[3, 6\]"),
    _conv_row("input_5d", lambda: (_x(1, 2, 3, 6, 6), _x(*W4)), match=r"input of size"),
    _conv_row("weight_3d", lambda: (_x(*X4), _x(4, 3, 3)), match=r"weight"),
    _conv_row("weight_5d", lambda: (_x(*X4), _x(4, 3, 3, 3, 1)), match=r"weight"),
    _conv_row("channel_mismatch", lambda: (_x(2, 5, 6, 6), _x(*W4)), match=r"channels"),
    _conv_row("groups_not_dividing_out", lambda: (_x(2, 4, 6, 6), _x(3, 2, 3, 3)), {"groups": 2}, r"groups=2"),
    _conv_row("groups_zero", lambda: (_x(*X4), _x(*W4)), {"groups": 0}, r"groups"),
    _conv_row("groups_negative", lambda: (_x(*X4), _x(*W4)), {"groups": -1}, r"groups"),
    _conv_row("stride_zero", lambda: (_x(*X4), _x(*W4)), {"stride": 0}, r"stride"),
    _conv_row("stride_negative", lambda: (_x(*X4), _x(*W4)), {"stride": (1, -2)}, r"stride"),
    _conv_row("stride_three_values", lambda: (_x(*X4), _x(*W4)), {"stride": (1, 1, 1)}, r"stride"),
    _conv_row("padding_negative", lambda: (_x(*X4), _x(*W4)), {"padding": -1}, r"padding"),
    _conv_row("padding_bad_string", lambda: (_x(*X4), _x(*W4)), {"padding": "full"}, r"padding"),
    _conv_row("padding_same_strided", lambda: (_x(*X4), _x(*W4)), {"padding": "same", "stride": 2}, r"same"),
    _conv_row("dilation_zero", lambda: (_x(*X4), _x(*W4)), {"dilation": 0}, r"dilation"),
    _conv_row("kernel_larger_than_input", lambda: (_x(1, 3, 2, 2), _x(*W4)), match=r"[Kk]ernel size"),
    _conv_row("zero_height_with_padding", lambda: (_x(1, 3, 0, 5), _x(*W4)), {"padding": 1}, r"[Kk]ernel size"),
    _conv_row("zero_out_channels", lambda: (_x(*X4), _x(0, 3, 3, 3)), match=r"weight"),
    _conv_row("bias_wrong_length", lambda: (_x(*X4), _x(*W4), _x(5)), match=r"bias"),
    _conv_row("bias_2d", lambda: (_x(*X4), _x(*W4), _x(4, 1)), match=r"bias"),
    _conv_row("weight_dtype", lambda: (_x(*X4), _x(*W4, dtype=torch.float64)), match=r"weight type"),
    _conv_row("bias_dtype", lambda: (_x(*X4), _x(*W4), _x(4, dtype=torch.float64)), match=r"bias type"),
    _conv_row("bool_input", lambda: (_x(*X4).bool(), _x(*W4).bool())),
    # Inputs torch accepts: the result must be torch's.
    _conv_row("int64", lambda: (torch.randint(-3, 3, X4), torch.randint(-3, 3, W4))),
    _conv_row("complex", lambda: (_x(*X4, dtype=torch.cfloat), _x(*W4, dtype=torch.cfloat))),
    _conv_row("zero_batch", lambda: (_x(0, 3, 6, 6), _x(*W4), _x(4))),
    _conv_row("unbatched", lambda: (_x(3, 6, 6), _x(*W4), _x(4))),
    _conv_row("expanded_input", lambda: (_x(1, 3, 6, 6).expand(4, 3, 6, 6), _x(*W4), _x(4))),
    _conv_row("expanded_weight", lambda: (_x(*X4), _x(1, 3, 3, 3).expand(4, 3, 3, 3))),
    _conv_row("strided_input", lambda: (_x(2, 3, 6, 12)[..., ::2], _x(*W4))),
    _conv_row("transposed_input", lambda: (_x(2, 3, 6, 6).transpose(2, 3), _x(*W4))),
    _conv_row("channels_last_input", lambda: (_x(*X4).contiguous(memory_format=torch.channels_last), _x(*W4))),
    _conv_row("channels_last_weight", lambda: (_x(*X4), _x(*W4).contiguous(memory_format=torch.channels_last))),
    _conv_row("strided_bias", lambda: (_x(*X4), _x(*W4), _x(8)[::2])),
    _conv_row("zero_width_with_padding", lambda: (_x(2, 3, 1, 0), _x(4, 3, 1, 1)), {"padding": (0, 1)},
              r"only zero batch or zero channel inputs"),
    _conv_row("zero_height_with_padding_strided", lambda: (_x(2, 3, 0, 2), _x(4, 3, 1, 1)),
              {"padding": (1, 0), "stride": 2}, r"only zero batch or zero channel inputs"),
    _conv_row("one_by_one_image", lambda: (_x(2, 3, 1, 1), _x(4, 3, 1, 1)), {"stride": 3, "dilation": 2}),
]


@pytest.mark.parametrize("row", _rows(CONV2D))
def test_conv2d_matches_torch_on_bad_and_unusual_input(row):
    _run_row(row)


def _relu_pool_twin(*args, **kwargs):
    return F.max_pool2d(F.relu(F.conv2d(*args, **kwargs)), 2, 2)


def _twin_row(name, ours, native, args, kwargs=None, match=None):
    kwargs = kwargs or {}
    return (name, args, lambda *a: ours(*a, **kwargs), lambda *a: native(*a, **kwargs), match)


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        ((0, 3, 6, 6), W4, {}),
        ((0, 4, 5, 7), (6, 2, 3, 2), {"padding": 1, "stride": (2, 1), "groups": 2}),
        ((0, 4, 0, 0), (4, 1, 1, 1), {"padding": 1, "groups": 4}),
    ],
)
def test_conv2d_gradients_match_torch_on_empty_batch(x_shape, w_shape, kwargs):
    x, w, b = _x(*x_shape).requires_grad_(True), _x(*w_shape).requires_grad_(True), _x(w_shape[0])
    b.requires_grad_(True)
    out, ref = conv2d(x, w, b, **kwargs), F.conv2d(x, w, b, **kwargs)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, (x, w, b), grad_out), torch.autograd.grad(ref, (x, w, b), grad_out)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("call", [conv2d, conv2d_relu, conv2d_relu_max_pool2d])
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_conv2d_with_zero_input_channels_raises_clearly(call, backend):
    # torch returns a tensor of 0 output channels here ([2, 0, 4, 4] for a weight of 4
    # output channels), which the next layer cannot use; fastlayers refuses clearly.
    assert F.conv2d(_x(2, 0, 6, 6), _x(4, 0, 3, 3)).shape == (2, 0, 4, 4)
    with fastlayers.use_backend(backend), pytest.raises(RuntimeError, match="0 input channels is not supported"):
        call(_x(2, 0, 6, 6), _x(4, 0, 3, 3), _x(4))


def _relu_twin(*args, **kwargs):
    return F.relu(F.conv2d(*args, **kwargs))


FUSED_CONV = [
    _twin_row("relu_channel_mismatch", conv2d_relu, _relu_twin, lambda: (_x(2, 5, 6, 6), _x(*W4)), match=r"channels"),
    _twin_row("relu_stride_zero", conv2d_relu, _relu_twin, lambda: (_x(*X4), _x(*W4)), {"stride": 0}, r"stride"),
    _twin_row("relu_zero_batch", conv2d_relu, _relu_twin, lambda: (_x(0, 3, 6, 6), _x(*W4), _x(4))),
    _twin_row("relu_expanded_input", conv2d_relu, _relu_twin, lambda: (_x(1, 3, 6, 6).expand(3, 3, 6, 6), _x(*W4))),
    _twin_row("pool_output_too_small", conv2d_relu_max_pool2d, _relu_pool_twin, lambda: (_x(1, 3, 3, 3), _x(*W4)),
              match=r"2x2 pooling window"),
    _twin_row("pool_weight_3d", conv2d_relu_max_pool2d, _relu_pool_twin, lambda: (_x(*X4), _x(4, 3, 3)),
              match=r"weight"),
    _twin_row("pool_bias_dtype", conv2d_relu_max_pool2d, _relu_pool_twin,
              lambda: (_x(*X4), _x(*W4), _x(4, dtype=torch.float64)), match=r"bias type"),
    _twin_row("pool_padding_negative", conv2d_relu_max_pool2d, _relu_pool_twin, lambda: (_x(*X4), _x(*W4)),
              {"padding": -1}, r"padding"),
    _twin_row("pool_zero_batch", conv2d_relu_max_pool2d, _relu_pool_twin, lambda: (_x(0, 3, 6, 6), _x(*W4))),
    _twin_row("pool_odd_size_channels_last", conv2d_relu_max_pool2d, _relu_pool_twin,
              lambda: (_x(2, 3, 7, 9).contiguous(memory_format=torch.channels_last), _x(*W4))),
    _twin_row("pool_expanded_input", conv2d_relu_max_pool2d, _relu_pool_twin,
              lambda: (_x(1, 3, 6, 6).expand(3, 3, 6, 6), _x(*W4))),
    _twin_row("pool_unbatched", conv2d_relu_max_pool2d, _relu_pool_twin, lambda: (_x(3, 6, 6), _x(*W4), _x(4))),
    _twin_row("conv1d_input_4d", conv1d, F.conv1d, lambda: (_x(*X4), _x(4, 3, 3)), match=r"input"),
    _twin_row("conv1d_weight_4d", conv1d, F.conv1d, lambda: (_x(2, 3, 6), _x(*W4)), match=r"weight"),
    _twin_row("conv1d_stride_pair", conv1d, F.conv1d, lambda: (_x(2, 3, 6), _x(4, 3, 3)), {"stride": (1, 1)},
              r"stride"),
    _twin_row("conv1d_padding_negative", conv1d, F.conv1d, lambda: (_x(2, 3, 6), _x(4, 3, 3)), {"padding": -2},
              r"padding"),
    _twin_row("conv1d_zero_length", conv1d, F.conv1d, lambda: (_x(2, 3, 0), _x(4, 3, 1))),
    _twin_row("conv1d_strided", conv1d, F.conv1d, lambda: (_x(2, 3, 12)[..., ::2], _x(4, 3, 3))),
    _twin_row("conv1d_unbatched", conv1d, F.conv1d, lambda: (_x(3, 6), _x(4, 3, 3), _x(4))),
]


@pytest.mark.parametrize("row", _rows(FUSED_CONV))
def test_fused_conv_and_conv1d_match_torch_on_bad_and_unusual_input(row):
    _run_row(row)


def _go(*shape):
    return _x(*shape)


RAW_CONV = [
    ("conv2d_input_3d", tuple, lambda: ops.conv2d(_x(3, 6, 6), _x(*W4), None, [1, 1], [0, 0], [1, 1], 1, False),
     None, (RuntimeError, r"4-D input")),
    ("conv2d_weight_dtype", tuple, lambda: ops.conv2d(_x(*X4), _x(*W4).double(), None, [1, 1], [0, 0], [1, 1], 1, False),
     None, (RuntimeError, r"weight type")),
    ("conv2d_int", tuple, lambda: ops.conv2d(torch.ones(X4, dtype=torch.long), torch.ones(W4, dtype=torch.long), None,
                                      [1, 1], [0, 0], [1, 1], 1, False), None, (TypeError, r"input must be float")),
    ("conv2d_stride_zero", tuple, lambda: ops.conv2d(_x(*X4), _x(*W4), None, [0, 1], [0, 0], [1, 1], 1, False),
     None, (RuntimeError, r"stride")),
    ("conv2d_groups_zero", tuple, lambda: ops.conv2d(_x(*X4), _x(*W4), None, [1, 1], [0, 0], [1, 1], 0, False),
     None, (RuntimeError, r"groups")),
    ("conv2d_zero_out_channels", tuple, lambda: ops.conv2d(_x(*X4), _x(0, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 1, False),
     None, (RuntimeError, r"weight")),
    ("conv2d_zero_width", tuple,
     lambda: ops.conv2d(_x(2, 3, 1, 0), _x(4, 3, 1, 1), None, [1, 1], [0, 1], [1, 1], 1, False),
     None, (RuntimeError, r"only zero batch")),
    ("conv2d_zero_in_channels", tuple,
     lambda: ops.conv2d(_x(2, 0, 6, 6), _x(4, 0, 3, 3), None, [1, 1], [0, 0], [1, 1], 1, False),
     None, (RuntimeError, r"0 input channels")),
    ("conv2d_bias_shape", tuple, lambda: ops.conv2d(_x(*X4), _x(*W4), _x(3), [1, 1], [0, 0], [1, 1], 1, False),
     None, (RuntimeError, r"bias")),
    ("backward_input_negative_size", tuple,
     lambda: ops.conv2d_backward_input(_go(2, 4, 1, 1), _x(*W4), [2, 3, -1, -1], [1, 1], [1, 1], [1, 1], 1),
     None, (RuntimeError, r"input_size")),
    ("backward_input_grad_shape", tuple,
     lambda: ops.conv2d_backward_input(_go(2, 4, 3, 3), _x(*W4), list(X4), [1, 1], [0, 0], [1, 1], 1),
     None, (RuntimeError, r"grad_output of shape \[2, 4, 4, 4\]")),
    ("backward_input_channel_mismatch", tuple,
     lambda: ops.conv2d_backward_input(_go(2, 4, 4, 4), _x(*W4), [2, 5, 6, 6], [1, 1], [0, 0], [1, 1], 1),
     None, (RuntimeError, r"channels")),
    ("backward_input_dtype", tuple,
     lambda: ops.conv2d_backward_input(_go(2, 4, 4, 4), _x(*W4).double(), list(X4), [1, 1], [0, 0], [1, 1], 1),
     None, (RuntimeError, r"weight type")),
    ("backward_weight_negative_size", tuple,
     lambda: ops.conv2d_backward_weight(_go(2, 4, 4, 4), _x(*X4), [4, -3, 3, 3], [1, 1], [0, 0], [1, 1], -1),
     None, (RuntimeError, r"groups")),
    ("backward_weight_size_negative_out", tuple,
     lambda: ops.conv2d_backward_weight(_go(2, 0, 4, 4), _x(*X4), [-4, 3, 3, 3], [1, 1], [0, 0], [1, 1], 1),
     None, (RuntimeError, r"weight_size")),
    ("backward_weight_grad_shape", tuple,
     lambda: ops.conv2d_backward_weight(_go(2, 4, 5, 4), _x(*X4), list(W4), [1, 1], [0, 0], [1, 1], 1),
     None, (RuntimeError, r"grad_output of shape")),
    ("backward_weight_dtype", tuple,
     lambda: ops.conv2d_backward_weight(_go(2, 4, 4, 4).double(), _x(*X4), list(W4), [1, 1], [0, 0], [1, 1], 1),
     None, (RuntimeError, r"grad_output type")),
    ("backward_bias_3d", tuple, lambda: ops.conv2d_backward_bias(_go(4, 4, 4)), None, (RuntimeError, r"4-D grad_output")),
    ("backward_bias_int", tuple, lambda: ops.conv2d_backward_bias(torch.ones(2, 4, 4, 4, dtype=torch.int32)), None,
     (TypeError, r"grad_output must be float")),
    ("pool_output_too_small", tuple,
     lambda: ops.conv2d_relu_max_pool2d(_x(1, 3, 3, 3), _x(*W4), None, [1, 1], [0, 0], [1, 1], 1),
     None, (RuntimeError, r"2x2 pooling window")),
    ("pool_backward_argmax_dtype", tuple,
     lambda: ops.conv2d_relu_max_pool2d_backward(_go(2, 4, 2, 2), _go(2, 4, 2, 2), torch.zeros(2, 4, 2, 2).long(),
                                                 [2, 4, 4, 4]), None, (RuntimeError, r"argmax must be uint8")),
    ("pool_backward_argmax_shape", tuple,
     lambda: ops.conv2d_relu_max_pool2d_backward(_go(2, 4, 2, 2), _go(2, 4, 2, 2),
                                                 torch.zeros(2, 4, 2, 1, dtype=torch.uint8), [2, 4, 4, 4]),
     None, (RuntimeError, r"argmax must be uint8")),
    ("pool_backward_argmax_out_of_window", tuple,
     lambda: ops.conv2d_relu_max_pool2d_backward(_go(2, 4, 2, 2), _go(2, 4, 2, 2),
                                                 torch.full((2, 4, 2, 2), 4, dtype=torch.uint8), [2, 4, 4, 4]),
     None, (ValueError, r"argmax holds 2x2 window positions 0..3, got a 4")),
    ("pool_backward_conv_size_mismatch", tuple,
     lambda: ops.conv2d_relu_max_pool2d_backward(_go(2, 4, 2, 2), _go(2, 4, 2, 2),
                                                 torch.zeros(2, 4, 2, 2, dtype=torch.uint8), [2, 4, 6, 4]),
     None, (RuntimeError, r"not the 2x2 pooling")),
    ("pool_backward_negative_conv_size", tuple,
     lambda: ops.conv2d_relu_max_pool2d_backward(_go(2, 4, 0, 0), _go(2, 4, 0, 0),
                                                 torch.zeros(2, 4, 0, 0, dtype=torch.uint8), [2, 4, -1, -1]),
     None, (RuntimeError, r"conv_size")),
    ("pool_backward_grad_shape", tuple,
     lambda: ops.conv2d_relu_max_pool2d_backward(_go(2, 4, 2, 1), _go(2, 4, 2, 2),
                                                 torch.zeros(2, 4, 2, 2, dtype=torch.uint8), [2, 4, 4, 4]),
     None, (RuntimeError, r"grad_output has shape")),
    ("pool_backward_int_output", tuple,
     lambda: ops.conv2d_relu_max_pool2d_backward(torch.ones(2, 4, 2, 2).long(), torch.ones(2, 4, 2, 2).long(),
                                                 torch.zeros(2, 4, 2, 2, dtype=torch.uint8), [2, 4, 4, 4]),
     None, (TypeError, r"output must be float")),
]


@pytest.mark.parametrize("row", _rows(RAW_CONV))
def test_raw_conv_ops_reject_bad_input_clearly(row):
    _run_row(row)


@pytest.mark.parametrize("stride, out_width", [(1, 2), (2, 1)])
def test_raw_conv2d_backward_input_of_an_input_without_pixels_is_empty(stride, out_width):
    # Padding alone gives the output its width; the input has no pixel.
    grad = ops.conv2d_backward_input(_go(2, 4, 1, out_width), _x(4, 3, 1, 1), [2, 3, 1, 0], [1, stride], [0, 1],
                                     [1, 1], 1)
    assert grad.shape == (2, 3, 1, 0)


@pytest.mark.parametrize(
    "make, call",
    [
        pytest.param(lambda: (torch.nn.Conv2d(3, 4, 3), fnn.Conv2d), lambda m: m(_x(2, 5, 6, 6)), id="conv2d_channels"),
        pytest.param(lambda: (torch.nn.Conv2d(3, 4, 3), fnn.Conv2d), lambda m: m(_x(6, 6)), id="conv2d_2d_input"),
        pytest.param(lambda: (torch.nn.Conv2d(3, 4, 3), fnn.Conv2d), lambda m: m(_x(*X4).double()), id="conv2d_dtype"),
        pytest.param(lambda: (torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), fnn.Conv2d),
                     lambda m: m(_x(2, 3, 0, 5)), id="conv2d_circular_zero_height"),
        pytest.param(lambda: (torch.nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"), fnn.Conv2d),
                     lambda m: m(_x(2, 3, 2, 5)), id="conv2d_reflect_padding_too_large"),
        pytest.param(lambda: (torch.nn.Conv1d(3, 4, 3), fnn.Conv1d), lambda m: m(_x(2, 5, 6)), id="conv1d_channels"),
        pytest.param(lambda: (torch.nn.Conv1d(3, 4, 3), fnn.Conv1d), lambda m: m(_x(2, 3, 6, 1)), id="conv1d_4d"),
        pytest.param(lambda: (torch.nn.Conv1d(3, 4, 3), fnn.Conv1d), lambda m: m(_x(0, 3, 6)), id="conv1d_zero_batch"),
    ],
)
def test_conv_modules_match_torch_on_bad_input(make, call):
    native, cls = make()
    ours = cls.from_torch(native)
    assert_like_torch(lambda: call(ours), lambda: call(native))


# ---- LSTM / RNN ----------------------------------------------------------------------

I, H, T, B = 4, 6, 5, 3


def _module_pair(native_cls, ours_cls, *args, **kwargs):
    torch.manual_seed(0)
    native = native_cls(*args, **kwargs)
    return native, ours_cls.from_torch(native)


def _lstm_hx(layers=1, batch=B, hidden=H, cell=H):
    return _x(layers, batch, hidden), _x(layers, batch, cell)


RNN_MODULES = [
    # (id, native class, ours class, constructor kwargs, make call arguments)
    ("lstm_input_4d", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, B, I, 1),)),
    ("lstm_input_1d", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(I),)),
    ("lstm_input_size", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, B, I + 1),)),
    ("lstm_zero_steps", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(0, B, I),)),
    ("lstm_zero_batch", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, 0, I),)),
    ("lstm_h_hidden_size", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, B, I), _lstm_hx(hidden=H - 1))),
    ("lstm_h_batch", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, B, I), (_x(1, B - 1, H), _x(1, B, H)))),
    ("lstm_c_hidden_size", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, B, I), _lstm_hx(cell=H + 1))),
    ("lstm_h_layers", torch.nn.LSTM, fnn.LSTM, {"num_layers": 2}, lambda: (_x(T, B, I), _lstm_hx(layers=1))),
    ("lstm_h_2d_for_batched", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, B, I), (_x(B, H), _x(B, H)))),
    ("lstm_h_3d_for_unbatched", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, I), _lstm_hx(batch=1))),
    ("lstm_input_float64", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, B, I, dtype=torch.float64),)),
    ("lstm_input_int", torch.nn.LSTM, fnn.LSTM, {}, lambda: (torch.ones(T, B, I, dtype=torch.long),)),
    ("lstm_input_complex", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(T, B, I, dtype=torch.cfloat),)),
    ("lstm_proj_h_size", torch.nn.LSTM, fnn.LSTM, {"proj_size": 2}, lambda: (_x(T, B, I), _lstm_hx(hidden=H))),
    ("lstm_proj_ok", torch.nn.LSTM, fnn.LSTM, {"proj_size": 2}, lambda: (_x(T, B, I), _lstm_hx(hidden=2))),
    ("lstm_transposed_input", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(B, T, I).transpose(0, 1),)),
    ("lstm_expanded_input", torch.nn.LSTM, fnn.LSTM, {}, lambda: (_x(1, B, I).expand(T, B, I),)),
    ("lstm_expanded_state", torch.nn.LSTM, fnn.LSTM, {},
     lambda: (_x(T, B, I), (_x(1, 1, H).expand(1, B, H), _x(1, 1, H).expand(1, B, H)))),
    ("lstm_batch_first_h_batch", torch.nn.LSTM, fnn.LSTM, {"batch_first": True},
     lambda: (_x(B, T, I), _lstm_hx(batch=T))),
    ("lstm_unbatched", torch.nn.LSTM, fnn.LSTM, {"bidirectional": True}, lambda: (_x(T, I),)),
    ("rnn_h_layers", torch.nn.RNN, fnn.RNN, {}, lambda: (_x(T, B, I), _x(2, B, H))),
    ("rnn_h_hidden_size", torch.nn.RNN, fnn.RNN, {}, lambda: (_x(T, B, I), _x(1, B, H + 1))),
    ("rnn_h_2d_for_batched", torch.nn.RNN, fnn.RNN, {}, lambda: (_x(T, B, I), _x(B, H))),
    ("rnn_input_4d", torch.nn.RNN, fnn.RNN, {}, lambda: (_x(T, B, I, 1),)),
    ("rnn_zero_steps", torch.nn.RNN, fnn.RNN, {"nonlinearity": "relu"}, lambda: (_x(0, B, I),)),
    ("rnn_input_float64", torch.nn.RNN, fnn.RNN, {}, lambda: (_x(T, B, I, dtype=torch.float64),)),
    ("lstm_cell_input_3d", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(1, B, I),)),
    ("lstm_cell_input_size", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(B, I + 1),)),
    ("lstm_cell_h_size", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(B, I), (_x(B, H - 1), _x(B, H)))),
    ("lstm_cell_c_size", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(B, I), (_x(B, H), _x(B, H - 1)))),
    ("lstm_cell_h_batch", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(B, I), (_x(B + 1, H), _x(B + 1, H)))),
    ("lstm_cell_h_1d_for_batched", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(B, I), (_x(H), _x(H)))),
    ("lstm_cell_h_3d", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(B, I), (_x(1, B, H), _x(1, B, H)))),
    ("lstm_cell_zero_batch", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(0, I),)),
    ("lstm_cell_unbatched", torch.nn.LSTMCell, fnn.LSTMCell, {}, lambda: (_x(I), (_x(H), _x(H)))),
    ("rnn_cell_input_3d", torch.nn.RNNCell, fnn.RNNCell, {}, lambda: (_x(1, B, I),)),
    ("rnn_cell_h_size", torch.nn.RNNCell, fnn.RNNCell, {}, lambda: (_x(B, I), _x(B, H + 1))),
    ("rnn_cell_h_batch", torch.nn.RNNCell, fnn.RNNCell, {"nonlinearity": "relu"}, lambda: (_x(B, I), _x(B - 1, H))),
    ("rnn_cell_expanded_input", torch.nn.RNNCell, fnn.RNNCell, {}, lambda: (_x(1, I).expand(B, I),)),
]


@pytest.mark.parametrize("native_cls, ours_cls, kwargs, make", [pytest.param(*r[1:], id=r[0]) for r in RNN_MODULES])
def test_rnn_modules_match_torch_on_bad_and_unusual_input(native_cls, ours_cls, kwargs, make):
    native, ours = _module_pair(native_cls, ours_cls, I, H, **kwargs)
    args = make()
    assert_like_torch(lambda: ours(*args), lambda: native(*args))


@pytest.mark.parametrize(
    "native_cls, ours_cls, args, kwargs",
    [
        pytest.param(torch.nn.LSTM, fnn.LSTM, (I, H), {"dropout": 2.0}, id="dropout_above_one"),
        pytest.param(torch.nn.LSTM, fnn.LSTM, (I, H), {"proj_size": H}, id="proj_size_not_below_hidden"),
        pytest.param(torch.nn.LSTM, fnn.LSTM, (I, H), {"proj_size": -1}, id="proj_size_negative"),
        pytest.param(torch.nn.LSTM, fnn.LSTM, (I, 0), {}, id="hidden_size_zero"),
        pytest.param(torch.nn.LSTM, fnn.LSTM, (0, H), {}, id="input_size_zero"),
        pytest.param(torch.nn.LSTM, fnn.LSTM, (I, H), {"num_layers": 0}, id="num_layers_zero"),
        pytest.param(torch.nn.RNN, fnn.RNN, (I, H), {"nonlinearity": "gelu"}, id="rnn_nonlinearity"),
        pytest.param(torch.nn.RNN, fnn.RNN, (I, H), {"proj_size": 2}, id="rnn_proj_size"),
    ],
)
def test_rnn_constructors_reject_what_torch_rejects(native_cls, ours_cls, args, kwargs):
    assert_like_torch(lambda: ours_cls(*args, **kwargs) and None, lambda: native_cls(*args, **kwargs) and None)


def _packed(lengths=(5, 3, 2), enforce_sorted=True, dtype=torch.float32):
    return pack_padded_sequence(_x(T, B, I, dtype=dtype), list(lengths), enforce_sorted=enforce_sorted)


@pytest.mark.parametrize(
    "native_cls, ours_cls, make",
    [
        pytest.param(torch.nn.LSTM, fnn.LSTM, lambda: (_packed(), _lstm_hx(batch=B - 1)), id="lstm_h_batch"),
        pytest.param(torch.nn.LSTM, fnn.LSTM, lambda: (_packed(), _lstm_hx(hidden=H + 1)), id="lstm_h_size"),
        pytest.param(torch.nn.LSTM, fnn.LSTM, lambda: (_packed((2, 5, 3), enforce_sorted=False), _lstm_hx()),
                     id="lstm_unsorted"),
        pytest.param(torch.nn.RNN, fnn.RNN, lambda: (_packed(), _x(1, B + 1, H)), id="rnn_h_batch"),
        pytest.param(torch.nn.RNN, fnn.RNN, lambda: (_packed((1, 1, 1)),), id="rnn_all_length_one"),
        # Hand-built PackedSequences: batch_sizes must not increase and start at the batch.
        pytest.param(torch.nn.LSTM, fnn.LSTM,
                     lambda: (PackedSequence(_x(6, I), torch.tensor([2, 3, 1])),), id="lstm_increasing_batch_sizes"),
        pytest.param(torch.nn.LSTM, fnn.LSTM,
                     lambda: (PackedSequence(_x(6, I), torch.tensor([3, 2])),), id="lstm_batch_sizes_sum_too_small"),
    ],
)
def test_packed_sequence_misuse_matches_torch(native_cls, ours_cls, make):
    native, ours = _module_pair(native_cls, ours_cls, I, H)
    args = make()
    assert_like_torch(lambda: ours(*args), lambda: native(*args))


@pytest.mark.parametrize(
    "module, args, exception, match",
    [
        # torch's cells fail inside their matmul (RuntimeError "mat1 and mat2 must have
        # the same dtype"); fastlayers checks first and names the argument (TypeError,
        # as the functional cells specify in test_rnn.py).
        pytest.param(lambda: fnn.LSTMCell(I, H), (_x(B, I, dtype=torch.float64),), TypeError,
                     r"w_ih dtype torch.float32 does not match input dtype torch.float64", id="lstm_cell_float64_input"),
        pytest.param(lambda: fnn.LSTMCell(I, H), (torch.ones(B, I, dtype=torch.long),), TypeError,
                     r"input must be float32, float64, float16 or bfloat16", id="lstm_cell_int_input"),
        pytest.param(lambda: fnn.RNNCell(I, H), (_x(B, I, dtype=torch.float64),), TypeError,
                     r"w_ih dtype torch.float32 does not match input dtype torch.float64", id="rnn_cell_float64_input"),
        # torch's LSTM raises this ValueError for padded input but a RuntimeError from its
        # matmul for packed input; fastlayers raises the ValueError for both.
        pytest.param(lambda: fnn.LSTM(I, H), (_packed(dtype=torch.float64),), ValueError,
                     r"RNN input dtype \(torch.float64\) does not match weight dtype", id="lstm_packed_float64"),
    ],
)
def test_rnn_dtype_mismatch_raises_before_any_matmul(module, args, exception, match):
    with pytest.raises(exception, match=match):
        module()(*args)


def _cell_weights(gates, dtype=torch.float32):
    return _x(gates * H, I, dtype=dtype), _x(gates * H, H, dtype=dtype), _x(gates * H, dtype=dtype), _x(
        gates * H, dtype=dtype)


def _vf_lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch._VF.lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


def _vf_rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch._VF.rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


def _vf_rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch._VF.rnn_relu_cell(input, hx, w_ih, w_hh, b_ih, b_hh)


FUNCTIONAL_CELLS = [
    _twin_row("lstm_input_size", lstm_cell, _vf_lstm_cell,
              lambda: (_x(B, I + 1), (_x(B, H), _x(B, H)), *_cell_weights(4)), match=r"input_size"),
    _twin_row("lstm_h_batch", lstm_cell, _vf_lstm_cell,
              lambda: (_x(B, I), (_x(B - 1, H), _x(B, H)), *_cell_weights(4)), match=r"batch size"),
    _twin_row("lstm_c_size", lstm_cell, _vf_lstm_cell,
              lambda: (_x(B, I), (_x(B, H), _x(B, H + 2)), *_cell_weights(4)), match=r"hidden1"),
    _twin_row("lstm_zero_batch", lstm_cell, _vf_lstm_cell,
              lambda: (_x(0, I), (_x(0, H), _x(0, H)), *_cell_weights(4))),
    _twin_row("lstm_transposed_weights", lstm_cell, _vf_lstm_cell,
              lambda: (_x(B, I), (_x(B, H), _x(B, H)), _x(I, 4 * H).t(), _x(H, 4 * H).t(), None, None)),
    _twin_row("rnn_tanh_h_size", rnn_tanh_cell, _vf_rnn_tanh_cell,
              lambda: (_x(B, I), _x(B, H - 1), *_cell_weights(1)), match=r"hidden_size"),
    _twin_row("rnn_relu_h_batch", rnn_relu_cell, _vf_rnn_relu_cell,
              lambda: (_x(B, I), _x(B + 1, H), *_cell_weights(1)), match=r"batch size"),
    _twin_row("rnn_tanh_expanded", rnn_tanh_cell, _vf_rnn_tanh_cell,
              lambda: (_x(1, I).expand(B, I), _x(1, H).expand(B, H), *_cell_weights(1))),
]


@pytest.mark.parametrize("row", _rows(FUNCTIONAL_CELLS))
def test_functional_cells_match_torch_on_bad_and_unusual_input(row):
    _run_row(row)


def _lstm_layer_args(steps=T, batch=B, hidden=H, dtype=torch.float32):
    return (_x(steps, batch, I, dtype=dtype), _x(batch, hidden, dtype=dtype), _x(batch, hidden, dtype=dtype),
            _x(4 * hidden, I, dtype=dtype), _x(4 * hidden, hidden, dtype=dtype), _x(4 * hidden, dtype=dtype),
            _x(4 * hidden, dtype=dtype))


def _with(args, index, value):
    args = list(args)
    args[index] = value
    return tuple(args)


def _lstm_backward_args():
    x, h, c, w_ih, w_hh, _, _ = _lstm_layer_args()
    out, cells, gates = ops.lstm_layer(x, h, c, w_ih, w_hh, None, None)
    return [torch.ones_like(out), torch.zeros_like(cells), x, h, c, w_ih, w_hh, out, cells, gates, False]


def _rnn_layer_args():
    return _x(T, B, I), _x(B, H), _x(H, I), _x(H, H), _x(H), _x(H)


RAW_RNN = [
    ("lstm_layer_input_2d", lambda: _with(_lstm_layer_args(), 0, _x(B, I)), ops.lstm_layer, None,
     (RuntimeError, r"input must be 3-D")),
    ("lstm_layer_zero_steps", lambda: _lstm_layer_args(steps=0), ops.lstm_layer, None,
     (RuntimeError, r"at least one time step")),
    ("lstm_layer_int", lambda: tuple(t.long() for t in _lstm_layer_args()), ops.lstm_layer, None,
     (TypeError, r"input must be float")),
    ("lstm_layer_w_hh_not_4h", lambda: _with(_lstm_layer_args(), 4, _x(3 * H, H)), ops.lstm_layer, None,
     (RuntimeError, r"w_hh must have shape")),
    ("lstm_layer_w_ih_rows", lambda: _with(_lstm_layer_args(), 3, _x(4 * H + 1, I)), ops.lstm_layer, None,
     (RuntimeError, r"w_ih must have shape")),
    ("lstm_layer_w_ih_1d", lambda: _with(_lstm_layer_args(), 3, _x(4 * H)), ops.lstm_layer, None,
     (RuntimeError, r"w_ih must have shape")),
    ("lstm_layer_hx_batch", lambda: _with(_lstm_layer_args(), 1, _x(B + 1, H)), ops.lstm_layer, None,
     (RuntimeError, r"batch size")),
    ("lstm_layer_cx_3d", lambda: _with(_lstm_layer_args(), 2, _x(1, B, H)), ops.lstm_layer, None,
     (RuntimeError, r"hidden1 must be 2-D")),
    ("lstm_layer_bias_shape", lambda: _with(_lstm_layer_args(), 5, _x(H)), ops.lstm_layer, None,
     (RuntimeError, r"b_ih must have shape")),
    ("lstm_layer_bias_dtype", lambda: _with(_lstm_layer_args(), 6, _x(4 * H, dtype=torch.float64)), ops.lstm_layer,
     None, (TypeError, r"b_hh dtype")),
    ("lstm_layer_weight_dtype", lambda: _with(_lstm_layer_args(), 4, _x(4 * H, H, dtype=torch.float64)),
     ops.lstm_layer, None, (TypeError, r"w_hh dtype")),
    ("lstm_layer_w_hr_1d", lambda: (*_with(_lstm_layer_args(hidden=H), 1, _x(B, 2)), _x(2)), ops.lstm_layer, None,
     (RuntimeError, r"w_hr must be 2-D")),
    ("lstm_layer_w_hr_mismatch", lambda: (*_lstm_layer_args(), _x(2, H)), ops.lstm_layer, None,
     (RuntimeError, r"w_hh must have shape")),
    ("lstm_layer_backward_gates_shape", lambda: _with(_lstm_backward_args(), 9, _x(T, B, 3 * H)),
     ops.lstm_layer_backward, None, (RuntimeError, r"gates must have shape")),
    ("lstm_layer_backward_cells_shape", lambda: _with(_lstm_backward_args(), 8, _x(T, B, H - 1)),
     ops.lstm_layer_backward, None, (RuntimeError, r"cells must have shape")),
    ("lstm_layer_backward_grad_steps", lambda: _with(_lstm_backward_args(), 0, _x(T - 1, B, H)),
     ops.lstm_layer_backward, None, (RuntimeError, r"grad_output must have shape")),
    ("lstm_layer_backward_grad_cells_dtype", lambda: _with(_lstm_backward_args(), 1, _x(T, B, H).double()),
     ops.lstm_layer_backward, None, (TypeError, r"grad_cells dtype")),
    ("lstm_layer_backward_output_shape", lambda: _with(_lstm_backward_args(), 7, _x(T, B + 1, H)),
     ops.lstm_layer_backward, None, (RuntimeError, r"output must have shape")),
    ("lstm_cell_input_3d", lambda: (_x(1, B, I), _x(B, H), _x(B, H), *_cell_weights(4)), ops.lstm_cell, None,
     (RuntimeError, r"input must be 2-D")),
    ("lstm_cell_backward_gates_shape",
     lambda: (_x(B, H), _x(B, H), _x(B, I), _x(B, H), _x(B, H), *_cell_weights(4)[:2], _x(B, H), _x(B, H), True),
     ops.lstm_cell_backward, None, (RuntimeError, r"gates must have shape")),
    ("rnn_layer_bad_nonlinearity", lambda: (*_rnn_layer_args(), "gelu"), ops.rnn_layer, None,
     (ValueError, r"unknown nonlinearity 'gelu'")),
    ("rnn_layer_w_hh_not_square", lambda: (*_with(_rnn_layer_args(), 3, _x(H, H + 1)), "tanh"), ops.rnn_layer, None,
     (RuntimeError, r"w_hh must have shape")),
    ("rnn_layer_hx_size", lambda: (*_with(_rnn_layer_args(), 1, _x(B, H + 1)), "relu"), ops.rnn_layer, None,
     (RuntimeError, r"hidden_size")),
    ("rnn_layer_backward_output_shape",
     lambda: (_x(T, B, H), _x(T, B, I), _x(B, H), _x(H, I), _x(H, H), _x(T, B, H + 1), True, "tanh"),
     ops.rnn_layer_backward, None, (RuntimeError, r"output must have shape")),
    ("rnn_cell_backward_hy_shape",
     lambda: (_x(B, H), _x(B, I), _x(B, H), _x(H, I), _x(H, H), _x(B + 1, H), True, "tanh"),
     ops.rnn_cell_backward, None, (RuntimeError, r"output must have shape")),
    ("rnn_cell_backward_bad_nonlinearity",
     lambda: (_x(B, H), _x(B, I), _x(B, H), _x(H, I), _x(H, H), _x(B, H), True, "sigmoid"),
     ops.rnn_cell_backward, None, (ValueError, r"unknown nonlinearity")),
]


@pytest.mark.parametrize("row", _rows(RAW_RNN))
def test_raw_rnn_ops_reject_bad_input_clearly(row):
    _run_row(row)


# ---- attention ---------------------------------------------------------------------

Q = (2, 4, 5, 8)


def _sdpa_row(name, args, kwargs=None, match=None):
    return _twin_row(name, scaled_dot_product_attention, F.scaled_dot_product_attention, args, kwargs, match)


def _qkv(q=Q, k=Q, v=Q, dtype=torch.float32):
    return _x(*q, dtype=dtype), _x(*k, dtype=dtype), _x(*v, dtype=dtype)


def _bool(*shape, p=0.7):
    return torch.rand(*shape) < p


SDPA = [
    _sdpa_row("query_1d", lambda: (_x(8), _x(8), _x(8)), match=r"at least 2 dimensional"),
    _sdpa_row("head_dim_mismatch", lambda: _qkv(k=(2, 4, 5, 7)), match=r"7"),
    _sdpa_row("batch_mismatch", lambda: _qkv(k=(3, 4, 5, 8), v=(3, 4, 5, 8))),
    _sdpa_row("heads_mismatch_without_gqa", lambda: _qkv(k=(2, 2, 5, 8), v=(2, 2, 5, 8))),
    _sdpa_row("heads_not_divisible_with_gqa", lambda: _qkv(k=(2, 3, 5, 8), v=(2, 3, 5, 8)), {"enable_gqa": True},
              r"heads"),
    _sdpa_row("mask_wrong_shape", lambda: (*_qkv(), _bool(5, 4))),
    _sdpa_row("mask_5d", lambda: (*_qkv(), _bool(1, 2, 4, 5, 5))),
    _sdpa_row("mask_int", lambda: (*_qkv(), torch.ones(5, 5, dtype=torch.long)), match=r"attn_mask"),
    _sdpa_row("mask_float64_for_float32", lambda: (*_qkv(), torch.zeros(5, 5, dtype=torch.float64)),
              match=r"attn_mask"),
    _sdpa_row("key_dtype", lambda: (_x(*Q), _x(*Q, dtype=torch.float64), _x(*Q)), match=r"dtype"),
    _sdpa_row("value_dtype", lambda: (_x(*Q), _x(*Q), _x(*Q, dtype=torch.float64)), match=r"dtype"),
    _sdpa_row("int_inputs", lambda: tuple(torch.ones(Q, dtype=torch.long) for _ in range(3))),
    _sdpa_row("bool_inputs", lambda: tuple(torch.ones(Q, dtype=torch.bool) for _ in range(3))),
    _sdpa_row("causal_with_mask", lambda: (*_qkv(), _bool(5, 5)), {"is_causal": True}, r"attn_mask"),
    _sdpa_row("dropout_above_one", lambda: _qkv(), {"dropout_p": 2.0}, r"dropout"),
    # Accepted by torch: same result.
    _sdpa_row("zero_query_length", lambda: _qkv(q=(2, 4, 0, 8))),
    _sdpa_row("zero_key_length", lambda: _qkv(k=(2, 4, 0, 8), v=(2, 4, 0, 8))),
    _sdpa_row("zero_batch", lambda: _qkv(q=(0, 4, 5, 8), k=(0, 4, 5, 8), v=(0, 4, 5, 8))),
    _sdpa_row("zero_value_dim", lambda: _qkv(v=(2, 4, 5, 0))),
    _sdpa_row("three_d_inputs", lambda: _qkv(q=(3, 5, 8), k=(3, 6, 8), v=(3, 6, 4))),
    _sdpa_row("broadcast_leading_dims", lambda: (_x(*Q), _x(1, 4, 5, 8), _x(1, 1, 5, 8))),
    _sdpa_row("transposed_inputs", lambda: tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv())),
    _sdpa_row("last_dim_strided", lambda: tuple(_x(2, 4, 5, 16)[..., ::2] for _ in range(3))),
    _sdpa_row("expanded_inputs", lambda: (_x(1, 4, 5, 8).expand(Q), _x(2, 1, 5, 8).expand(Q), _x(1, 1, 1, 8).expand(Q))),
    _sdpa_row("expanded_bool_mask", lambda: (*_qkv(), _bool(1, 1, 1, 5).expand(2, 4, 5, 5))),
    _sdpa_row("float_mask_strided", lambda: (*_qkv(), _x(5, 10)[:, ::2])),
    _sdpa_row("causal_more_keys", lambda: _qkv(k=(2, 4, 7, 8), v=(2, 4, 7, 8)), {"is_causal": True}),
    _sdpa_row("causal_fewer_keys", lambda: _qkv(k=(2, 4, 3, 8), v=(2, 4, 3, 8)), {"is_causal": True}),
    _sdpa_row("gqa", lambda: _qkv(k=(2, 2, 5, 8), v=(2, 2, 5, 8)), {"enable_gqa": True}),
]


@pytest.mark.parametrize("row", _rows(SDPA))
def test_sdpa_matches_torch_on_bad_and_unusual_input(row):
    _run_row(row)


def test_sdpa_rejects_value_length_that_differs_from_key_length():
    # torch's CPU SDPA returns a result here without looking; a key without a value has
    # no meaning, so fastlayers raises.
    q, k, v = _qkv(v=(2, 4, 6, 8))
    with pytest.raises(RuntimeError, match=r"value length 6 does not match key's 5"):
        scaled_dot_product_attention(q, k, v)


def _mha_pair(**kwargs):
    torch.manual_seed(0)
    native = torch.nn.MultiheadAttention(8, 2, **kwargs)
    return native, fnn.MultiheadAttention.from_torch(native)


MHA = [
    # (id, constructor kwargs, make (query, key, value, forward kwargs))
    ("embed_dim_mismatch", {}, lambda: (_x(5, 3, 6), _x(5, 3, 6), _x(5, 3, 6), {})),
    ("key_value_shape_mismatch", {}, lambda: (_x(5, 3, 8), _x(6, 3, 8), _x(7, 3, 8), {})),
    ("query_4d", {}, lambda: (_x(5, 3, 8, 1), _x(5, 3, 8), _x(5, 3, 8), {})),
    ("key_batch_mismatch", {}, lambda: (_x(5, 3, 8), _x(6, 2, 8), _x(6, 2, 8), {})),
    ("key_padding_mask_shape", {}, lambda: (_x(5, 3, 8), _x(6, 3, 8), _x(6, 3, 8),
                                            {"key_padding_mask": _bool(3, 5), "need_weights": False})),
    ("key_padding_mask_int", {}, lambda: (_x(5, 3, 8), _x(6, 3, 8), _x(6, 3, 8),
                                          {"key_padding_mask": torch.zeros(3, 6, dtype=torch.long)})),
    ("attn_mask_2d_shape", {}, lambda: (_x(5, 3, 8), _x(6, 3, 8), _x(6, 3, 8),
                                        {"attn_mask": _bool(5, 5), "need_weights": False})),
    ("attn_mask_3d_shape", {}, lambda: (_x(5, 3, 8), _x(6, 3, 8), _x(6, 3, 8),
                                        {"attn_mask": _bool(3, 5, 6), "need_weights": False})),
    ("attn_mask_4d", {}, lambda: (_x(5, 3, 8), _x(6, 3, 8), _x(6, 3, 8),
                                  {"attn_mask": _bool(1, 6, 5, 6), "need_weights": False})),
    ("attn_mask_int", {}, lambda: (_x(5, 3, 8), _x(6, 3, 8), _x(6, 3, 8),
                                   {"attn_mask": torch.zeros(5, 6, dtype=torch.long), "need_weights": False})),
    ("is_causal_without_mask", {}, lambda: (_x(5, 3, 8), _x(5, 3, 8), _x(5, 3, 8), {"is_causal": True})),
    ("float64_input", {}, lambda: (_x(5, 3, 8, dtype=torch.float64),) * 3 + ({"need_weights": False},)),
    ("zero_batch", {}, lambda: (_x(5, 0, 8), _x(6, 0, 8), _x(6, 0, 8), {"need_weights": False})),
    ("zero_batch_with_weights", {}, lambda: (_x(5, 0, 8), _x(6, 0, 8), _x(6, 0, 8), {})),
    ("zero_source_length", {}, lambda: (_x(5, 3, 8), _x(0, 3, 8), _x(0, 3, 8), {"need_weights": False})),
    ("unbatched_with_3d_mask", {}, lambda: (_x(5, 8), _x(6, 8), _x(6, 8),
                                            {"key_padding_mask": _bool(3, 6), "need_weights": False})),
    ("kdim_mismatch", {"kdim": 4, "vdim": 4}, lambda: (_x(5, 3, 8), _x(6, 3, 8), _x(6, 3, 4), {})),
    ("batch_first_transposed", {"batch_first": True},
     lambda: (_x(5, 3, 8).transpose(0, 1), _x(6, 3, 8).transpose(0, 1), _x(6, 3, 8).transpose(0, 1),
              {"need_weights": False})),
]


@pytest.mark.parametrize("kwargs, make", [pytest.param(*r[1:], id=r[0]) for r in MHA])
def test_multihead_attention_matches_torch_on_bad_and_unusual_input(kwargs, make):
    native, ours = _mha_pair(**kwargs)
    q, k, v, forward_kwargs = make()
    if q.dtype == torch.float64:
        native, ours = native.double(), ours.double()
    assert_like_torch(lambda: ours(q, k, v, **forward_kwargs), lambda: native(q, k, v, **forward_kwargs))


def test_multihead_attention_zero_batch_with_key_padding_mask_gives_empty_output():
    # torch raises here with need_weights=False (its view(bsz, num_heads, -1, src_len) of
    # the merged mask is ambiguous for 0 elements) and returns the empty output with
    # need_weights=True; fastlayers returns the empty output either way.
    native, ours = _mha_pair()
    x, pad = _x(5, 0, 8), torch.zeros(0, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="ambiguous"):
        native(x, x, x, key_padding_mask=pad, need_weights=False)
    for need_weights in (False, True):
        out, _ = ours(x, x, x, key_padding_mask=pad, need_weights=need_weights)
        assert out.shape == (5, 0, 8)


@pytest.mark.parametrize(
    "args, kwargs",
    [
        pytest.param((8, 3), {}, id="heads_not_dividing_embed_dim"),
        pytest.param((0, 2), {}, id="embed_dim_zero"),
        pytest.param((8, 0), {}, id="zero_heads"),
        pytest.param((-8, 2), {}, id="embed_dim_negative"),
    ],
)
def test_multihead_attention_constructor_rejects_what_torch_rejects(args, kwargs):
    assert_like_torch(lambda: fnn.MultiheadAttention(*args, **kwargs) and None,
                      lambda: torch.nn.MultiheadAttention(*args, **kwargs) and None)


@pytest.mark.parametrize(
    "make, exception, match",
    [
        pytest.param(lambda: (fnn.LuongAttention(8), (_x(3, 8),)), ValueError, r"encoder_outputs must be", id="2d"),
        pytest.param(lambda: (fnn.LuongAttention(8), (_x(3, 5, 7),)), ValueError, r"encoder_outputs must be",
                     id="hidden_size"),
        pytest.param(lambda: (fnn.LuongAttention(8), (_x(3, 5, 8), _x(3, 7))), ValueError, r"query must be",
                     id="query_size"),
        pytest.param(lambda: (fnn.LuongAttention(8, "general"), (_x(3, 5, 8), _x(2, 8))), ValueError,
                     r"query must be", id="query_batch"),
        pytest.param(lambda: (fnn.LuongAttention(8), (_x(3, 5, 8), None, _bool(3, 4))), ValueError,
                     r"mask must be \(batch, steps\)", id="mask_shape"),
        pytest.param(lambda: (fnn.LuongAttention(8, "concat"), (_x(3, 5, 8), None, torch.zeros(3, 5))), TypeError,
                     r"mask must be a bool tensor", id="mask_float"),
        pytest.param(lambda: (fnn.LuongAttention(8), (_x(3, 5, 8, dtype=torch.float64),)), RuntimeError,
                     r"same dtype", id="input_dtype"),
        pytest.param(lambda: (fnn.LuongAttention(8, "bilinear"), ()), ValueError, r"score must be one of",
                     id="unknown_score"),
        pytest.param(lambda: (fnn.LuongAttention(0), ()), ValueError, r"hidden_size must be positive",
                     id="hidden_size_zero"),
    ],
)
def test_luong_attention_rejects_bad_input_clearly(make, exception, match):
    with pytest.raises(exception, match=match):
        module, args = make()
        module(*args)


def test_luong_attention_zero_steps_gives_zero_context():
    # No encoder step at all: every row is fully masked, context and weights are empty sums.
    context, weights = fnn.LuongAttention(8)(_x(3, 0, 8))
    torch.testing.assert_close(context, torch.zeros(3, 8))
    assert weights.shape == (3, 0)


def _flash_args(q=Q, k=Q, v=Q, mask=None, dtype=torch.float32):
    return (*_qkv(q, k, v, dtype), mask, False, 0.5)


def _flash_backward_args(**changes):
    q, k, v, mask, causal, scale = _flash_args()
    out, lse = ops.flash_attention(q, k, v, mask, causal, scale)
    args = {"grad_output": torch.ones_like(out), "query": q, "key": k, "value": v, "output": out, "logsumexp": lse,
            "attn_mask": mask, "is_causal": causal, "scale": scale}
    args.update({name: make() for name, make in changes.items()})
    return tuple(args.values())


RAW_ATTENTION = [
    ("query_3d", lambda: _flash_args(q=(4, 5, 8)), ops.flash_attention, None, (RuntimeError, r"query must be 4-D")),
    ("value_5d", lambda: (*_qkv()[:2], _x(1, *Q), None, False, 1.0), ops.flash_attention, None,
     (RuntimeError, r"value must be 4-D")),
    ("int", lambda: tuple(torch.ones(Q, dtype=torch.long) for _ in range(3)) + (None, False, 1.0),
     ops.flash_attention, None, (TypeError, r"query must be float")),
    ("complex", lambda: _flash_args(dtype=torch.cfloat), ops.flash_attention, None, (TypeError, r"query must be")),
    ("key_dtype", lambda: (_x(*Q), _x(*Q).double(), _x(*Q), None, False, 1.0), ops.flash_attention, None,
     (TypeError, r"key dtype")),
    ("batch_mismatch", lambda: _flash_args(k=(1, 4, 5, 8), v=(1, 4, 5, 8)), ops.flash_attention, None,
     (RuntimeError, r"same batch size")),
    ("head_dim_mismatch", lambda: _flash_args(k=(2, 4, 5, 6)), ops.flash_attention, None,
     (RuntimeError, r"key head dim 6")),
    ("value_length", lambda: _flash_args(v=(2, 4, 6, 8)), ops.flash_attention, None,
     (RuntimeError, r"value must have key's heads and length")),
    ("heads_not_multiple", lambda: _flash_args(k=(2, 3, 5, 8), v=(2, 3, 5, 8)), ops.flash_attention, None,
     (RuntimeError, r"multiple of key/value heads")),
    ("zero_kv_heads", lambda: _flash_args(k=(2, 0, 5, 8), v=(2, 0, 5, 8)), ops.flash_attention, None,
     (RuntimeError, r"multiple of key/value heads")),
    ("mask_int", lambda: _flash_args(mask=torch.zeros(5, 5, dtype=torch.long)), ops.flash_attention, None,
     (TypeError, r"attn_mask must be bool")),
    ("mask_float64", lambda: _flash_args(mask=torch.zeros(5, 5, dtype=torch.float64)), ops.flash_attention, None,
     (TypeError, r"attn_mask must be bool")),
    ("mask_shape", lambda: _flash_args(mask=_bool(5, 4)), ops.flash_attention, None,
     (RuntimeError, r"does not broadcast")),
    ("mask_5d", lambda: _flash_args(mask=_bool(1, 2, 4, 5, 5)), ops.flash_attention, None,
     (RuntimeError, r"does not broadcast")),
    ("mask_batch", lambda: _flash_args(mask=_bool(3, 1, 5, 5)), ops.flash_attention, None,
     (RuntimeError, r"does not broadcast")),
    ("backward_lse_dtype", lambda: _flash_backward_args(logsumexp=lambda: torch.zeros(2, 4, 5, dtype=torch.float64)),
     ops.flash_attention_backward, None, (TypeError, r"logsumexp must be")),
    ("backward_lse_shape", lambda: _flash_backward_args(logsumexp=lambda: torch.zeros(2, 4, 4)),
     ops.flash_attention_backward, None, (RuntimeError, r"logsumexp must have shape")),
    ("backward_output_shape", lambda: _flash_backward_args(output=lambda: _x(2, 4, 5, 7)),
     ops.flash_attention_backward, None, (RuntimeError, r"output must have shape")),
    ("backward_grad_shape", lambda: _flash_backward_args(grad_output=lambda: _x(2, 4, 6, 8)),
     ops.flash_attention_backward, None, (RuntimeError, r"grad_output must have shape")),
    ("backward_grad_dtype", lambda: _flash_backward_args(grad_output=lambda: _x(*Q).double()),
     ops.flash_attention_backward, None, (TypeError, r"grad_output dtype")),
    ("backward_mask_shape", lambda: _flash_backward_args(attn_mask=lambda: _bool(4, 5)),
     ops.flash_attention_backward, None, (RuntimeError, r"does not broadcast")),
]


@pytest.mark.parametrize("row", _rows(RAW_ATTENTION))
def test_raw_attention_ops_reject_bad_input_clearly(row):
    _run_row(row)


@pytest.mark.cuda
@requires_cuda_kernels
def test_arguments_on_different_devices_raise():
    device = "cuda"
    x = _x(2, 3, 6, 6).to(device)
    with pytest.raises(RuntimeError, match="weight is on"):
        conv2d(x, _x(*W4))
    with pytest.raises(RuntimeError, match="bias is on"):
        bias_act(x, _x(3))
    q = _x(*Q).to(device)
    with pytest.raises(RuntimeError, match="key is on"):
        ops.flash_attention(q, _x(*Q), q, None, False, 1.0)
    with pytest.raises(RuntimeError, match="hidden0 is on"):
        ops.rnn_cell(_x(B, I).to(device), _x(B, H), *(t.to(device) for t in _cell_weights(1)), "tanh")
