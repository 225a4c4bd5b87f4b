"""fastlayers.functional.conv2d / conv2d_relu / conv2d_relu_max_pool2d / conv1d and the
fastlayers.nn convolution modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers.functional import conv1d, conv2d, conv2d_relu, conv2d_relu_max_pool2d
from fastlayers.ops.conv2d import (
    conv2d_reference,
    conv2d_relu_max_pool2d_reference,
    conv2d_relu_reference,
    resolve_padding,
)
from helpers import (
    assert_close_to_oracle,
    assert_no_worse_than_torch,
    make_layout,
    requires_cuda_kernels,
    requires_extension,
)

pytestmark = requires_extension

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups): kernel sizes 1/3/5/7
# and non-square, strides, paddings incl. 'same'/'valid' and wider than the kernel,
# dilations, groups incl. depthwise, odd sizes, tiny and larger channel counts
# (C_out not a multiple of the vector width), batch 1.
CASES = [
    (2, 3, 8, 9, 9, 3, 1, 1, 1, 1),
    (1, 4, 6, 7, 11, 1, 1, 0, 1, 1),
    (2, 5, 7, 13, 10, 5, 2, 2, 1, 1),
    (1, 3, 20, 15, 15, 7, 1, 3, 1, 1),
    (2, 8, 16, 9, 8, (3, 5), (2, 1), (1, 2), 1, 1),
    (2, 6, 9, 11, 12, 3, 1, "same", 2, 3),
    (1, 8, 8, 10, 9, 3, 1, "valid", 1, 8),
    (2, 8, 16, 9, 9, 3, 2, 1, 1, 8),
    (1, 70, 100, 6, 7, 3, 1, 1, 1, 1),
    (2, 4, 4, 8, 8, 4, 1, "same", 1, 1),
    (1, 3, 5, 5, 5, 3, 3, 4, (1, 2), 1),
    (3, 2, 33, 16, 16, 2, 2, 0, 1, 1),
    (1, 16, 200, 5, 5, 3, 1, 1, 1, 2),
    (2, 80, 80, 9, 7, 3, 2, 1, 1, 80),
    (2, 4, 6, 11, 10, 3, 2, 1, 2, 1),  # stride 2, dilation 2: even input rows get no tap
    (1, 3, 4, 12, 13, (4, 3), (3, 2), (2, 0), (2, 3), 1),
    (3, 37, 20, 5, 7, 1, 1, 0, 1, 1),  # 1x1 over several images: grad-weight reads NCHW in place
    # grad-input of narrow input groups goes through columns (grad_input_by_columns in
    # csrc/conv2d/conv2d.cpp): most cases above; 12 channels are two float64 vectors at
    # AVX2. Wider strided groups take the stride phases:
    (2, 12, 10, 9, 11, 3, 2, 1, 1, 1),
    (2, 20, 8, 11, 10, 3, 2, 1, 1, 1),
    (1, 36, 12, 12, 13, (3, 2), (2, 3), (1, 0), (2, 1), 2),
    # stride 1, <= 6 output channels a group: the forward through columns too
    # (forward_by_columns), here with a dilated, non-square kernel.
    (2, 7, 5, 10, 11, (5, 3), 1, (2, 0), (1, 2), 1),
]
CASE_IDS = [f"case{i}" for i in range(len(CASES))]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _tensors(case, dtype, layout="contiguous", device="cpu", requires_grad=False):
    n, cin, cout, h, w, k, stride, padding, dilation, groups = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = make_layout(torch.randn(n, cin, h, w, dtype=torch.float64, device=device).to(dtype), layout)
    weight = torch.randn(cout, cin // groups, kh, kw, dtype=torch.float64, device=device).to(dtype)
    bias = torch.randn(cout, dtype=torch.float64, device=device).to(dtype)
    for t in (x, weight, bias):
        t.requires_grad_(requires_grad)
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _reference_args(x, weight, kwargs):
    """Pairs and resolved padding for the reference; 'same' with an odd total pads x."""
    stride = [kwargs["stride"]] * 2 if isinstance(kwargs["stride"], int) else list(kwargs["stride"])
    dilation = [kwargs["dilation"]] * 2 if isinstance(kwargs["dilation"], int) else list(kwargs["dilation"])
    padding, extra = resolve_padding(kwargs["padding"], weight, stride, dilation)
    if extra != [0, 0]:
        x = F.pad(x, [0, extra[1], 0, extra[0]])
    return x, dict(stride=stride, padding=padding, dilation=dilation, groups=kwargs["groups"])


def _oracle(fn, x, weight, bias, kwargs):
    x64, ref_kwargs = _reference_args(x.double(), weight.double(), kwargs)
    return fn(x64, weight.double(), None if bias is None else bias.double(), **ref_kwargs)


def _assert_matches(actual, native, oracle, dtype, msg=""):
    if dtype == torch.float64:
        assert_close_to_oracle(actual, oracle, dtype, msg)
    else:  # float32 sums of hundreds of products: no worse than torch's own rounding
        scale = oracle.abs().max().item() if oracle.numel() else 1.0
        assert_no_worse_than_torch(actual, native, oracle, floor=2e-6 * max(scale, 1.0))


def _native_forward(name, x, weight, bias, kwargs):
    y = F.conv2d(x, weight, bias, **kwargs)
    if name == "conv2d":
        return y
    y = torch.relu(y)
    return y if name == "conv2d_relu" else F.max_pool2d(y, 2, 2)


OPS = {
    "conv2d": (conv2d, conv2d_reference),
    "conv2d_relu": (conv2d_relu, conv2d_relu_reference),
    "conv2d_relu_max_pool2d": (conv2d_relu_max_pool2d, conv2d_relu_max_pool2d_reference),
}


def _poolable(case, name):
    if name != "conv2d_relu_max_pool2d":
        return True
    x, weight, _, kwargs = _tensors(case, torch.float64)
    out = F.conv2d(x, weight, None, **kwargs)
    return out.shape[2] >= 2 and out.shape[3] >= 2


def _check_forward_and_grads(name, x, weight, bias, kwargs, dtype, msg="", grads_of=3):
    """OPS[name] against native torch and the float64 oracle: the output, then the
    gradients of the first `grads_of` of (x, weight, bias). Returns (ours, native)."""
    fn, reference = OPS[name]
    y = fn(x, weight, bias, **kwargs)
    native = _native_forward(name, x, weight, bias, kwargs)
    oracle_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    oracle = _oracle(reference, *oracle_inputs, kwargs)
    assert y.shape == native.shape and y.dtype == dtype
    _assert_matches(y, native, oracle, dtype, f"{msg} forward")
    grad = torch.randn_like(native)
    leaves = (x, weight, bias)[:grads_of]
    ours = torch.autograd.grad(y, leaves, grad)
    theirs = torch.autograd.grad(native, leaves, grad)
    expected = torch.autograd.grad(oracle, oracle_inputs[:grads_of], grad.double())
    for what, a, n, o in zip(("input", "weight", "bias"), ours, theirs, expected):
        assert a.shape == o.shape
        _assert_matches(a, n, o, dtype, f"{msg} grad {what}")
    return y, native


# ---- forward and backward parity over the grid -----------------------------------


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_grads_match_float64_oracle_and_native_torch(case, dtype, layout, name):
    if not _poolable(case, name):
        pytest.skip("convolution output smaller than the pooling window")
    x, weight, bias, kwargs = _tensors(case, dtype, layout, requires_grad=True)
    _check_forward_and_grads(name, x, weight, bias, kwargs, dtype)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("input_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("weight_format", ["contiguous", "channels_last"])
def test_output_memory_format_is_the_one_torch_gives(name, input_format, weight_format):
    x, weight, bias, kwargs = _tensors(CASES[0], torch.float32, input_format)
    weight = make_layout(weight, weight_format)
    y = OPS[name][0](x, weight, bias, **kwargs)
    native = _native_forward(name, x, weight, bias, kwargs)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert y.is_contiguous(memory_format=fmt) == native.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[8], CASES[11], CASES[16], CASES[17], CASES[18], CASES[20]],
                         ids=["k5s2", "depthwise", "c70to100", "c33", "1x1", "c12s2", "c20s2", "c7to5"])
def test_every_cpu_isa_matches_the_oracle(cpu_isa, case):
    for dtype in (torch.float32, torch.float64):
        x, weight, bias, kwargs = _tensors(case, dtype, requires_grad=True)
        _check_forward_and_grads("conv2d_relu_max_pool2d", x, weight, bias, kwargs, dtype, cpu_isa)


def test_conv_larger_than_one_task_and_one_depth_block_matches_torch():
    # 3 * 3 * 64 = 576 depth steps (several L1 blocks), 2 * 30 * 30 pixels (many tasks),
    # and grad-weight pixel chunks summed in order.
    x = torch.randn(2, 64, 30, 30, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(80, 64, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(80, dtype=torch.float64, requires_grad=True)
    y = conv2d(x, weight, bias, padding=1)
    native = F.conv2d(x, weight, bias, padding=1)
    assert_close_to_oracle(y, native, torch.float64)
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, weight, bias), grad), torch.autograd.grad(native, (x, weight, bias), grad)):
        assert_close_to_oracle(a, b, torch.float64)


# 3x3, stride 1, undilated, ungrouped, >= 16 channels in and out: the forward runs
# Winograd F(2x2, 3x3) (winograd_applies in csrc/conv2d/conv2d.cpp). Output sizes that
# cut tiles at the edge (odd, one row, one pixel), channel counts off the vector width,
# paddings 0..2 and asymmetric.
WINOGRAD_CASES = [
    (1, 16, 16, 3, 3, 0),
    (2, 16, 24, 5, 7, 1),
    (1, 19, 33, 8, 9, 2),
    (3, 64, 128, 16, 16, 1),
    (1, 40, 17, 1, 6, 1),
    (2, 32, 48, 13, 30, (1, 0)),
    (2, 16, 17, 64, 33, 1),  # 1,088 tiles: grad-weight sums two chunks of 544
]


def _winograd_tensors(case, dtype, layout="contiguous", requires_grad=False):
    n, cin, cout, h, w, padding = case
    return _tensors((n, cin, cout, h, w, 3, 1, padding, 1, 1), dtype, layout, requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["conv2d", "conv2d_relu"])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=[f"winograd{i}" for i in range(len(WINOGRAD_CASES))])
def test_winograd_forward_and_grads_match_the_oracle_and_torch(case, name, layout, dtype):
    # grad-input with padding <= 2 is the same kind of convolution (flipped, transposed
    # weight, padding 2 - pad) and runs Winograd too; grad-weight runs F(3x3, 2x2).
    x, weight, bias, kwargs = _winograd_tensors(case, dtype, layout, requires_grad=True)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for b in (bias, None):
        actual, _ = _check_forward_and_grads(name, x, weight, b, kwargs, dtype, grads_of=2)
        assert actual.is_contiguous(memory_format=fmt)


def test_winograd_matches_the_oracle_on_every_cpu_isa(cpu_isa):
    for dtype in (torch.float32, torch.float64):
        for case in (WINOGRAD_CASES[2], WINOGRAD_CASES[5]):
            x, weight, bias, kwargs = _winograd_tensors(case, dtype, requires_grad=True)
            _check_forward_and_grads("conv2d_relu", x, weight, bias, kwargs, dtype, cpu_isa, grads_of=2)


@pytest.mark.parametrize("where", ["input_inf", "input_nan", "weight_inf", "bias_nan"])
@pytest.mark.parametrize("channels", [(16, 24), (5, 3)], ids=["winograd", "narrow"])
def test_forward_keeps_torchs_infs_and_nans(channels, where):
    # Winograd (16 -> 24): the transforms mix a tile's 4x4 pixels, so one inf would turn
    # all four outputs of every tile it touches into NaN; a non-finite result sends the
    # call to the direct pass. Narrow (5 -> 3): the columns forward never multiplies the
    # zero padding, so an infinite weight sends the call to the direct pass, whose sum over
    # the padding gives torch's 0 * inf = NaN at the edges. Either way torch's values:
    # inf / NaN only where a direct sum meets one (float64: torch's float32 oneDNN forward
    # skips the padding taps an infinite weight meets, see the README).
    cin, cout = channels
    x, weight, bias = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, cin, 8, 9), (cout, cin, 3, 3), (cout,)))
    if where == "input_inf":
        x[0, 3, 2, 5] = float("inf")
    elif where == "input_nan":
        x[1, 0, 7, 8] = float("nan")
    elif where == "weight_inf":
        weight[1, 2, 0, 1] = float("-inf")
    else:
        bias[2] = float("nan")
    for name in ("conv2d", "conv2d_relu"):
        actual = OPS[name][0](x, weight, bias, padding=1)
        native = _native_forward(name, x, weight, bias, dict(padding=1))
        assert torch.equal(actual.isnan(), native.isnan()) and torch.equal(actual.isinf(), native.isinf())
        finite = native.isfinite()
        torch.testing.assert_close(actual[finite], native[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["grad_output", "input"])
def test_winograd_grads_keep_torchs_infs_and_nans(where):
    # grad-input and grad-weight (Winograd F(3x3, 2x2)) fall back to the direct passes too.
    x = torch.randn(2, 16, 8, 9, dtype=torch.float64)
    weight = torch.randn(24, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 24, 8, 9, dtype=torch.float64)
    if where == "grad_output":
        grad[0, 5, 3, 4] = float("inf")
        grad[1, 2, 0, 0] = float("nan")
    else:
        x[1, 7, 4, 4] = float("-inf")
    x.requires_grad_()
    actual = torch.autograd.grad(conv2d(x, weight, None, padding=1), (x, weight), grad)
    native = torch.autograd.grad(F.conv2d(x, weight, None, padding=1), (x, weight), grad)
    for a, n in zip(actual, native):
        assert torch.equal(a.isnan(), n.isnan()) and torch.equal(a.isinf(), n.isinf())
        finite = n.isfinite()
        torch.testing.assert_close(a[finite], n[finite], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["conv2d", "conv2d_relu_max_pool2d"])
def test_results_do_not_depend_on_the_thread_count(name):
    # Task and grad-weight chunk partitions follow the thread count; the sums must not.
    x, weight, bias, kwargs = _tensors((3, 16, 24, 12, 12, 3, 1, 1, 1, 1), torch.float64, requires_grad=True)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, previous, 3):
            torch.set_num_threads(threads)
            y = OPS[name][0](x, weight, bias, **kwargs)
            results.append((y, *torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_close_to_oracle(b, a, torch.float64)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_narrow_layers_over_several_chunks_of_images_match_torch(layout):
    # The columns passes take images in ~4 MB chunks of columns (run_columns): a stem's
    # grad-input (1.8 MB of columns an image: chunks of 2, 2 and 1 images) and a 3-channel
    # output layer's forward (0.4 MB an image: chunks of 9 and 1), NCHW read in place or
    # channels_last placed, against torch and the float64 oracle.
    cases = [((5, 3, 112, 112), (64, 3, 7, 7), dict(stride=2, padding=3, dilation=1, groups=1)),
             ((10, 64, 64, 64), (3, 64, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1))]
    for x_shape, w_shape, kwargs in cases:
        x = make_layout(torch.randn(x_shape), layout).requires_grad_()
        weight = torch.randn(w_shape, requires_grad=True)
        bias = torch.randn(w_shape[0], requires_grad=True)
        _check_forward_and_grads("conv2d", x, weight, bias, kwargs, torch.float32, f"{x_shape} {layout}")


@pytest.mark.parametrize("stride", [1, 2])
def test_narrow_layers_are_bitwise_the_same_for_any_thread_count(stride):
    # 5 -> 3 channels: the columns forward (stride 1) and grad-input, and the narrow
    # grad-weight's chunks of output rows (six here), all shaped by the layer alone.
    x, weight, bias, kwargs = _tensors((4, 5, 3, 20, 20, 3, stride, 1, 1, 1), torch.float32, requires_grad=True)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = conv2d(x, weight, bias, **kwargs)
            results.append((y, *torch.autograd.grad(y, (x, weight, bias), torch.linspace(-1, 1, y.numel()).view_as(y))))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_winograd_grad_weight_is_bitwise_the_same_for_any_thread_count():
    # Its chunks of tiles (two here) follow the shape, not the thread count.
    x, weight, bias, kwargs = _winograd_tensors(WINOGRAD_CASES[-1], torch.float32, requires_grad=True)
    grad = torch.randn(x.shape[0], weight.shape[0], *x.shape[2:])
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(torch.autograd.grad(conv2d(x, weight, bias, **kwargs), (x, weight, bias), grad))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_are_no_worse_than_torch(dtype):
    x, weight, bias, kwargs = _tensors(CASES[0], dtype, requires_grad=True)
    y = conv2d(x, weight, bias, **kwargs)
    native = F.conv2d(x, weight, bias, **kwargs)
    oracle = _oracle(conv2d_reference, x.detach(), weight.detach(), bias.detach(), kwargs)
    assert y.dtype == dtype
    assert_no_worse_than_torch(y, native, oracle, floor=1e-2)
    grad = torch.randn_like(native)
    for a, n in zip(torch.autograd.grad(y, (x, weight, bias), grad), torch.autograd.grad(native, (x, weight, bias), grad)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), n.float(), rtol=5e-2, atol=5e-2 * n.float().abs().max().item())


def test_unbatched_input_and_no_bias():
    x = torch.randn(3, 9, 9, dtype=torch.float64)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    for fn, name in ((conv2d, "conv2d"), (conv2d_relu, "conv2d_relu"), (conv2d_relu_max_pool2d, "pool")):
        y = fn(x, weight, None, padding=1)
        native = _native_forward("conv2d_relu_max_pool2d" if name == "pool" else name,
                                 x.unsqueeze(0), weight, None, dict(padding=1)).squeeze(0)
        assert_close_to_oracle(y, native, torch.float64)


def test_batch_zero_gives_empty_output_and_zero_weight_grad():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    y = conv2d(x, weight, bias, padding=1)
    assert y.shape == F.conv2d(x, weight, bias, padding=1).shape
    y.sum().backward()
    assert weight.grad.abs().sum() == 0 and bias.grad.abs().sum() == 0 and x.grad.shape == x.shape


def test_integer_inputs_run_the_reference_exactly():
    # No kernel for int64 (torch itself has none with padding): the reference computes it.
    x = torch.randint(-3, 4, (2, 3, 6, 6))
    weight = torch.randint(-3, 4, (4, 3, 3, 3))
    y = conv2d(x, weight, padding=1)
    assert y.dtype == torch.int64
    torch.testing.assert_close(y, F.conv2d(x.double(), weight.double(), padding=1).long())


def test_relu_and_pool_pass_gradients_exactly_where_torch_does():
    # Zeros and ties: the gradient goes to the first maximum of each window, and not
    # through outputs the ReLU clamped to 0 (threshold_backward's rule).
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 1] = x[0, 0, 0, 1] = 1.0
    x[0, 0, 2:, 2:] = -1.0
    x = x.requires_grad_()
    weight = torch.ones(2, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    y = conv2d_relu_max_pool2d(x, weight, bias)
    native = F.max_pool2d(torch.relu(F.conv2d(x, weight, bias)), 2, 2)
    torch.testing.assert_close(y, native)
    grad = torch.arange(1.0, 9.0, dtype=torch.float64).view_as(y)
    for a, b in zip(torch.autograd.grad(y, (x, weight, bias), grad), torch.autograd.grad(native, (x, weight, bias), grad)):
        torch.testing.assert_close(a, b)


def test_pool_backward_saves_argmax_not_the_preactivation():
    x, weight, bias, kwargs = _tensors(CASES[0], torch.float32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv2d_relu_max_pool2d(x, weight, bias, **kwargs)
    conv_shape = F.conv2d(x, weight, bias, **kwargs).shape
    assert not any(t.shape == conv_shape for t in saved)
    assert any(t.dtype == torch.uint8 and t.shape == y.shape for t in saved)


# ---- gradcheck, opcheck, torch.compile ----------------------------------------------


# Small shapes: gradcheck runs the op twice per input element.
GRADCHECK_CASES = {
    "k3": (1, 2, 3, 6, 6, 3, 1, 1, 1, 1),
    "nonsquare_stride": (1, 2, 4, 7, 6, (3, 2), (2, 1), (1, 0), 1, 1),
    "same_dilation_groups": (1, 4, 4, 7, 7, 3, 1, "same", 2, 2),
    "depthwise_stride2": (1, 3, 6, 7, 7, 3, 2, 1, 1, 3),
    "stride3_dilation2": (1, 2, 3, 9, 8, 3, (3, 2), (1, 2), 2, 1),
}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("case", list(GRADCHECK_CASES.values()), ids=list(GRADCHECK_CASES))
def test_gradcheck_float64(case, name):
    x, weight, bias, kwargs = _tensors(case, torch.float64, requires_grad=True)
    if not _poolable(case, name):
        pytest.skip("convolution output smaller than the pooling window")
    fn = OPS[name][0]
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, **kwargs), (x, weight, bias))


@pytest.mark.parametrize("name", list(OPS))
def test_gradgradcheck_float64(name):
    x, weight, bias, kwargs = _tensors((1, 2, 3, 6, 6, 3, 1, 1, 1, 1), torch.float64, requires_grad=True)
    fn = OPS[name][0]
    assert torch.autograd.gradgradcheck(lambda a, b, c: fn(a, b, c, **kwargs), (x, weight, bias))


def _op_samples():
    for case, layout in ((CASES[0], "contiguous"), (CASES[4], "channels_last"), (CASES[7], "contiguous")):
        x, weight, bias, kwargs = _tensors(case, torch.float32, layout, requires_grad=True)
        x2, stride_padding = _reference_args(x.detach(), weight, kwargs)
        p = stride_padding
        yield x2.requires_grad_(), weight, bias, p["stride"], p["padding"], p["dilation"], p["groups"]


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_forward_ops(sample):
    x, weight, bias, stride, padding, dilation, groups = list(_op_samples())[sample]
    for relu in (False, True):
        torch.library.opcheck(torch.ops.fastlayers.conv2d.default, (x, weight, bias, stride, padding, dilation, groups, relu))
        torch.library.opcheck(torch.ops.fastlayers.conv2d.default, (x, weight, None, stride, padding, dilation, groups, relu))
    torch.library.opcheck(
        torch.ops.fastlayers.conv2d_relu_max_pool2d.default, (x, weight, bias, stride, padding, dilation, groups)
    )


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_backward_ops(sample):
    x, weight, bias, stride, padding, dilation, groups = list(_op_samples())[sample]
    x, weight = x.detach(), weight.detach()
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    g = torch.randn_like(y)
    args = (stride, padding, dilation, groups)
    torch.library.opcheck(torch.ops.fastlayers.conv2d_backward_input.default, (g, weight, list(x.shape), *args))
    torch.library.opcheck(torch.ops.fastlayers.conv2d_backward_weight.default, (g, x, list(weight.shape), *args))
    torch.library.opcheck(torch.ops.fastlayers.conv2d_backward_bias.default, (g,))
    pooled, argmax = torch.ops.fastlayers.conv2d_relu_max_pool2d.default(x, weight, None, *args)
    torch.library.opcheck(
        torch.ops.fastlayers.conv2d_relu_max_pool2d_backward.default,
        (torch.randn_like(pooled), pooled, argmax, list(y.shape)),
    )


class _SeedCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = fastlayers.nn.Conv2dReLUMaxPool2d(3, 8, 3, padding=1)
        self.conv = fastlayers.nn.Conv2d(8, 8, 3, padding="same")
        self.block2 = fastlayers.nn.Conv2dReLU(8, 4, 3, padding=1)

    def forward(self, x):
        return self.block2(self.conv(self.block1(x))).mean(dim=(2, 3))


def test_torch_compile_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = _SeedCNN()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    params = list(model.parameters())
    y_eager = model(x)
    g_eager = torch.autograd.grad(y_eager.sum(), params)
    y_comp = compiled(x)
    g_comp = torch.autograd.grad(y_comp.sum(), params)
    torch.testing.assert_close(y_comp, y_eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_compiled_graph_calls_the_fastlayers_ops():
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    f = torch.compile(lambda a, w: conv2d_relu_max_pool2d(a, w, padding=1) + conv2d(a, w, padding=1)[..., ::2, ::2],
                      backend=backend, fullgraph=True)
    f(torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3))
    assert "fastlayers.conv2d_relu_max_pool2d.default" in seen and "fastlayers.conv2d.default" in seen


def test_reference_backend_runs_the_reference():
    x, weight, bias, kwargs = _tensors(CASES[0], torch.float64)
    with fastlayers.use_backend("reference"):
        with torch.profiler.profile() as prof:
            y = conv2d(x, weight, bias, **kwargs)
    assert not any(e.name.startswith("fastlayers::") for e in prof.events())
    assert_close_to_oracle(y, F.conv2d(x, weight, bias, **kwargs), torch.float64)


# ---- errors: the exception types torch raises ------------------------------------------


ERROR_CASES = {
    "bad_padding_string": (lambda x, w: dict(padding="full")),
    "same_with_stride": (lambda x, w: dict(padding="same", stride=2)),
    "zero_stride": (lambda x, w: dict(stride=0)),
    "negative_padding": (lambda x, w: dict(padding=-1)),
    "zero_dilation": (lambda x, w: dict(dilation=0)),
    "zero_groups": (lambda x, w: dict(groups=0)),
    "groups_mismatch": (lambda x, w: dict(groups=2)),
    "stride_of_3": (lambda x, w: dict(stride=(1, 1, 1))),
}


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("fn", [conv2d, conv2d_relu, conv2d_relu_max_pool2d], ids=lambda f: f.__name__)
@pytest.mark.parametrize("what", list(ERROR_CASES))
def test_bad_arguments_raise_what_torch_raises(what, fn, backend):
    x, weight = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    kwargs = ERROR_CASES[what](x, weight)
    with pytest.raises(Exception) as native:
        F.conv2d(x, weight, **kwargs)
    with fastlayers.use_backend(backend), pytest.raises(native.type):
        fn(x, weight, **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.randn(2, 2, 8, 8), torch.randn(4, 3, 3, 3), None),  # channel mismatch
        lambda: (torch.randn(2, 3, 2, 2), torch.randn(4, 3, 3, 3), None),  # kernel larger than input
        lambda: (torch.randn(3, 8), torch.randn(4, 3, 3, 3), None),  # 2-D input
        lambda: (torch.randn(2, 3, 8, 8).double(), torch.randn(4, 3, 3, 3), None),  # dtype mismatch
        lambda: (torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5)),  # bias shape
        lambda: (torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4).double()),  # bias dtype
    ],
    ids=["channels", "kernel_too_large", "input_2d", "dtype", "bias_shape", "bias_dtype"],
)
def test_bad_tensors_raise_what_torch_raises(make):
    x, weight, bias = make()
    with pytest.raises(Exception) as native:
        F.conv2d(x, weight, bias)
    with pytest.raises(native.type):
        conv2d(x, weight, bias)


# ---- modules --------------------------------------------------------------------------

MODULE_KWARGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2), groups=2, bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding=2, padding_mode="circular"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="replicate"),
]


@pytest.mark.parametrize("kwargs", MODULE_KWARGS, ids=range(len(MODULE_KWARGS)))
def test_conv2d_module_is_a_drop_in_for_torch(kwargs):
    torch.manual_seed(1)
    ours = fastlayers.nn.Conv2d(**kwargs)
    torch.manual_seed(1)
    theirs = torch.nn.Conv2d(**kwargs)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)  # same initialisation from the same seed
    x = torch.randn(2, kwargs["in_channels"], 9, 10, requires_grad=True)
    y, native = ours(x), theirs(x)
    torch.testing.assert_close(y, native, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    native.sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    # state_dict both ways, and from_torch
    theirs.load_state_dict(fastlayers.nn.Conv2d(**kwargs).state_dict())
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    converted = fastlayers.nn.Conv2d.from_torch(theirs)
    assert isinstance(converted, torch.nn.Conv2d) and type(converted) is fastlayers.nn.Conv2d
    torch.testing.assert_close(converted(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=4, stride=2, dilation=2, groups=2, bias=False),
        dict(in_channels=3, out_channels=5, kernel_size=4, padding="same", padding_mode="reflect"),
        dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
    ],
    ids=range(4),
)
def test_conv1d_module_is_a_drop_in_for_torch(kwargs):
    torch.manual_seed(1)
    ours = fastlayers.nn.Conv1d(**kwargs)
    torch.manual_seed(1)
    theirs = torch.nn.Conv1d(**kwargs)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    for a, b in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    for x in (torch.randn(2, kwargs["in_channels"], 17, requires_grad=True), torch.randn(kwargs["in_channels"], 17)):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    converted = fastlayers.nn.Conv1d.from_torch(theirs)
    torch.testing.assert_close(converted.weight, theirs.weight)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(stride=2, padding=1), dict(padding="same", dilation=2), dict(groups=2, padding="valid")],
    ids=range(4),
)
def test_functional_conv1d_matches_torch_forward_and_backward(kwargs):
    x = torch.randn(3, 4, 19, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4 // kwargs.get("groups", 1), 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = conv1d(x, weight, bias, **kwargs)
    want = F.conv1d(x, weight, bias, **kwargs)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(want)
    for got, ref in zip(torch.autograd.grad(y, (x, weight, bias), g), torch.autograd.grad(want, (x, weight, bias), g)):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("cls,post", [
    (fastlayers.nn.Conv2dReLU, torch.relu),
    (fastlayers.nn.Conv2dReLUMaxPool2d, lambda y: F.max_pool2d(torch.relu(y), 2, 2)),
])
def test_fused_modules_match_conv_relu_pool_and_share_state_dict(cls, post):
    torch.manual_seed(2)
    block = cls(3, 8, 3, padding=1)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert list(block.state_dict()) == ["weight", "bias"]
    conv.load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(block(x), post(conv(x)), rtol=1e-5, atol=1e-5)
    conv2 = torch.nn.Conv2d(3, 8, 3, padding=1)
    block.load_state_dict(conv2.state_dict())
    torch.testing.assert_close(cls.from_torch(conv2)(x), post(conv2(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(x), post(conv2(x)), rtol=1e-5, atol=1e-5)


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError):
        fastlayers.nn.Conv2d.from_torch(torch.nn.Conv1d(3, 4, 3))


# ---- CUDA (skips without a GPU) -------------------------------------------------------


@requires_cuda_kernels
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[7], CASES[8]], ids=["k3", "nonsquare", "depthwise", "c70to100"])
def test_cuda_forward_and_grads_no_worse_than_torch(case, name, dtype):
    fn, reference = OPS[name]
    x, weight, bias, kwargs = _tensors(case, dtype, device="cuda", requires_grad=True)
    y = fn(x, weight, bias, **kwargs)
    native = _native_forward(name, x, weight, bias, kwargs)
    oracle_inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    oracle = _oracle(reference, *oracle_inputs, kwargs)
    assert_no_worse_than_torch(y, native, oracle, floor=1e-5 * oracle.abs().max().item())
    grad = torch.randn_like(native)
    ours = torch.autograd.grad(y, (x, weight, bias), grad)
    theirs = torch.autograd.grad(native, (x, weight, bias), grad)
    expected = torch.autograd.grad(oracle, oracle_inputs, grad.double())
    for a, n, o in zip(ours, theirs, expected):
        assert_no_worse_than_torch(a, n, o, floor=1e-5 * o.abs().max().item())
