"""2-D convolution with fused epilogues: conv2d, conv2d + bias + ReLU, and
conv2d + bias + ReLU + 2x2 max-pool.

* ``torch.ops.fastlayers.conv2d`` (``relu`` flag), ``conv2d_backward_input``,
  ``conv2d_backward_weight``, ``conv2d_backward_bias``, ``conv2d_relu_max_pool2d`` and
  ``conv2d_relu_max_pool2d_backward``: CPU kernels in csrc/conv2d/ (an implicit GEMM
  on an NHWC image with a register-tiled micro-kernel), schemas in csrc/registration.cpp;
* here: fake kernels, autograd, the public wrappers and the pure-PyTorch reference
  (strided views of the padded input and an einsum, independent of torch's
  convolution kernels), which
  is the fallback where no kernel exists (other devices, integer dtypes) and the oracle
  of the tests.

The convolution is ``y[n, o, i, j] = b[o] + sum_{c, k, l} x[n, c, s*i + d*k - p, s*j + d*l - p] w[o, c, k, l]``
(within a group). What the backward saves:

* ``conv2d``: input and weight (the output too with ``relu``, whose derivative is a
  function of it; the ReLU's backward is ``bias_act_backward``);
* ``conv2d_relu_max_pool2d``: input, weight, the pooled output and a uint8 argmax
  (the window position 0..3 of each maximum): a quarter of the pooled output's bytes
  in float32, instead of the pre-pool activation, which the forward never stores.

Higher-order gradients (``create_graph=True``) run through differentiable torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from fastlayers import _extension, backend
from fastlayers.ops.autograd import register_autograd

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _pair(value, name: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    value = list(value)
    if len(value) == 1:
        return value * 2
    if len(value) != 2:
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of 2 values to match the "
            f"convolution dimensions, but got {name}={value}"
        )
    return [int(v) for v in value]


def _check_input_dim(input: torch.Tensor, name: str = "conv2d") -> None:
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to {name}, but got input of size: {list(input.shape)}"
        )


def resolve_padding(padding, weight: torch.Tensor, stride: list[int], dilation: list[int]):
    """(symmetric padding, extra bottom/right padding) for an int, a pair, 'valid' or 'same'.

    'same' with an odd total padding puts the extra row/column at the bottom/right,
    as torch does."""
    if not isinstance(padding, str):
        return _pair(padding, "padding"), [0, 0]
    if padding == "valid":
        return [0, 0], [0, 0]
    if padding != "same":
        raise RuntimeError(f"Invalid padding string: '{padding}'")
    if any(s != 1 for s in stride):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    return [t // 2 for t in total], [t - t // 2 - t // 2 for t in total]


def _output_size(input_size, weight_size, stride, padding, dilation) -> list[int]:
    return [
        (input_size[2 + i] + 2 * padding[i] - dilation[i] * (weight_size[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    ]


def _wants_channels_last(*tensors: torch.Tensor) -> bool:
    return any(suggest_memory_format(t) == torch.channels_last for t in tensors)


def check_args(input, weight, bias, stride, padding, dilation, groups, op="conv2d") -> None:
    """The checks of the C++ entry (csrc/conv2d/conv2d.cpp), with torch's exception types."""
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"{op}: non-positive stride is not supported, got stride={list(stride)}")
    if any(p < 0 for p in padding):
        raise RuntimeError(f"{op}: negative padding is not supported, got padding={list(padding)}")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(f"{op}: non-positive dilation is not supported, got dilation={list(dilation)}")
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported, got groups={groups}")
    if input.dim() != 4:
        raise RuntimeError(f"{op}: expected a 4-D input (N, C, H, W), got shape {list(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"{op}: expected a 4-D weight (C_out, C_in / groups, kH, kW), got shape {list(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {input.device}")
        if t.dtype != input.dtype:
            raise RuntimeError(f"{op}: input type ({input.dtype}) and {name} type ({t.dtype}) should be the same")
    if weight.shape[0] < groups:
        raise RuntimeError(
            f"{op}: given groups={groups}, expected weight to be at least {groups} at dimension 0, "
            f"but got weight of size {list(weight.shape)} instead"
        )
    if weight.shape[0] % groups != 0:
        raise RuntimeError(
            f"{op}: given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of shape {list(weight.shape)}"
        )
    if input.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(
            f"{op}: given groups={groups}, weight of size {list(weight.shape)}, expected input{list(input.shape)} "
            f"to have {weight.shape[1] * groups} channels, but got {input.shape[1]} channels instead"
        )
    if input.shape[1] == 0:
        raise RuntimeError(
            f"{op}: a convolution over 0 input channels is not supported, got input of shape "
            f"{list(input.shape)} and weight of shape {list(weight.shape)}"
        )
    if input.shape[0] != 0 and (input.shape[2] == 0 or input.shape[3] == 0):
        raise RuntimeError(
            f"{op}: only zero batch or zero channel inputs are supported, but got input shape: {list(input.shape)}"
        )
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, weight.shape[2:])]
    padded = [input.shape[2 + i] + 2 * padding[i] for i in range(2)]
    if padded[0] < spans[0] or padded[1] < spans[1]:
        raise RuntimeError(
            f"{op}: calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
            f"({spans[0]} x {spans[1]}). Kernel size can't be greater than actual input size"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(
            f"{op}: expected bias of shape [{weight.shape[0]}] (the weight's dimension 0), got {list(bias.shape)}"
        )


# ---- reference ------------------------------------------------------------------


def conv2d_reference(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """4-D convolution as the sum over each receptive field, from strided views of the
    zero-padded input and one einsum per call (any dtype, any batch size)."""
    check_args(input, weight, bias, stride, padding, dilation, groups)
    n, c, h, w = input.shape
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = _output_size(input.shape, weight.shape, stride, padding, dilation)
    padded = F.pad(input, [padding[1], padding[1], padding[0], padding[0]])
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    # [N, C, out_h, out_w, kh, kw]: the receptive field of each output pixel
    fields = padded.unfold(2, span_h, stride[0]).unfold(3, span_w, stride[1])[..., :: dilation[0], :: dilation[1]]
    fields = fields.reshape(n, groups, c // groups, out_h, out_w, kh, kw)
    wg = weight.reshape(groups, out_channels // groups, c // groups, kh, kw)
    out = torch.einsum("ngcijkl,gockl->ngoij", fields, wg).reshape(n, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def conv2d_relu_reference(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return torch.relu(conv2d_reference(input, weight, bias, stride, padding, dilation, groups))


def conv2d_relu_max_pool2d_reference(
    input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1
):
    return F.max_pool2d(conv2d_relu_reference(input, weight, bias, stride, padding, dilation, groups), 2, 2)


# ---- torch.library registrations -------------------------------------------------


def _kernel_devices(name: str) -> frozenset[str]:
    """Device types with a registered fastlayers::<name> kernel (read once: dynamo
    cannot trace the dispatcher query)."""
    if not _extension.available():
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(
        d for d, key in keys.items() if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlayers::{name}", key)
    )


_KERNEL_DEVICES = {name: _kernel_devices(name) for name in ("conv2d", "conv2d_relu_max_pool2d")}


if _extension.available():

    def _conv_out_size(input, weight, stride, padding, dilation):
        return [input.shape[0], weight.shape[0], *_output_size(input.shape, weight.shape, stride, padding, dilation)]

    def _empty(size, like, channels_last, dtype=None):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(size, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)

    @torch.library.register_fake("fastlayers::conv2d")
    def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups, relu):
        check_args(input, weight, bias, stride, padding, dilation, groups)
        size = _conv_out_size(input, weight, stride, padding, dilation)
        return _empty(size, input, _wants_channels_last(input, weight))

    @torch.library.register_fake("fastlayers::conv2d_backward_input")
    def _conv2d_backward_input_fake(grad_output, weight, input_size, stride, padding, dilation, groups):
        return _empty(list(input_size), grad_output, _wants_channels_last(grad_output))

    @torch.library.register_fake("fastlayers::conv2d_backward_weight")
    def _conv2d_backward_weight_fake(grad_output, input, weight_size, stride, padding, dilation, groups):
        return input.new_empty(list(weight_size))

    @torch.library.register_fake("fastlayers::conv2d_backward_bias")
    def _conv2d_backward_bias_fake(grad_output):
        return grad_output.new_empty(grad_output.shape[1])

    @torch.library.register_fake("fastlayers::conv2d_relu_max_pool2d")
    def _conv2d_relu_max_pool2d_fake(input, weight, bias, stride, padding, dilation, groups):
        check_args(input, weight, bias, stride, padding, dilation, groups, "conv2d_relu_max_pool2d")
        n, c, h, w = _conv_out_size(input, weight, stride, padding, dilation)
        channels_last = _wants_channels_last(input, weight)
        size = [n, c, h // 2, w // 2]
        return _empty(size, input, channels_last), _empty(size, input, channels_last, torch.uint8)

    @torch.library.register_fake("fastlayers::conv2d_relu_max_pool2d_backward")
    def _conv2d_relu_max_pool2d_backward_fake(grad_output, output, argmax, conv_size):
        return _empty(list(conv_size), grad_output, True)

    def _conv_grads(ctx, grad_z, input, weight):
        """(grad_input, grad_weight) of the bare convolution from d loss / d (conv output)."""
        args = (ctx.stride, ctx.padding, ctx.dilation, ctx.groups)
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_z, input, weight, None, *args[:3], False, [0, 0], ctx.groups,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
            )
            return grad_input, grad_weight
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.fastlayers.conv2d_backward_input.default(grad_z, weight, list(input.shape), *args)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.fastlayers.conv2d_backward_weight.default(grad_z, input, list(weight.shape), *args)
        return grad_input, grad_weight

    def _save_geometry(ctx, stride, padding, dilation, groups, bias):
        ctx.stride, ctx.padding, ctx.dilation, ctx.groups = list(stride), list(padding), list(dilation), groups
        ctx.has_bias = bias is not None

    def _conv2d_setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, relu = inputs
        _save_geometry(ctx, stride, padding, dilation, groups, bias)
        ctx.relu = relu
        ctx.save_for_backward(input, weight, output if relu else None)

    def _conv2d_backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        grad_bias = None
        if ctx.relu and torch.is_grad_enabled():
            # threshold_backward's rule: the gradient passes where the output is not <= 0.
            grad_z = torch.where(output <= 0, torch.zeros_like(grad_output), grad_output)
        elif ctx.relu:
            grad_z, _ = torch.ops.fastlayers.bias_act_backward.default(grad_output, output, None, "relu")
        else:
            grad_z = grad_output
        if ctx.has_bias and ctx.needs_input_grad[2]:
            if torch.is_grad_enabled():
                grad_bias = grad_z.sum((0, 2, 3))
            else:
                grad_bias = torch.ops.fastlayers.conv2d_backward_bias.default(grad_z)
        grad_input, grad_weight = _conv_grads(ctx, grad_z, input, weight)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None

    register_autograd("fastlayers::conv2d", _conv2d_backward, setup_context=_conv2d_setup_context)

    def _pool_setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        _save_geometry(ctx, stride, padding, dilation, groups, bias)
        pooled, argmax = output
        ctx.conv_size = _conv_out_size(input, weight, stride, padding, dilation)
        ctx.mark_non_differentiable(argmax)
        ctx.save_for_backward(input, weight, pooled, argmax)

    def _unpool_differentiable(grad, pooled, argmax, conv_size):
        """The backward's unpooling in differentiable ops (for create_graph=True)."""
        n, c, ph, pw = pooled.shape
        rows = torch.arange(ph, device=pooled.device).view(1, 1, ph, 1) * 2
        cols = torch.arange(pw, device=pooled.device).view(1, 1, 1, pw) * 2
        q = argmax.long()
        indices = (rows + q // 2) * conv_size[3] + cols + q % 2
        masked = torch.where(pooled <= 0, torch.zeros_like(grad), grad)
        return F.max_unpool2d(masked, indices, 2, 2, output_size=conv_size[2:])

    def _pool_backward(ctx, grad_output, _grad_argmax):
        input, weight, pooled, argmax = ctx.saved_tensors
        if torch.is_grad_enabled():
            grad_z = _unpool_differentiable(grad_output, pooled, argmax, ctx.conv_size)
        else:
            grad_z = torch.ops.fastlayers.conv2d_relu_max_pool2d_backward.default(
                grad_output, pooled, argmax, ctx.conv_size
            )
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            if torch.is_grad_enabled():
                grad_bias = grad_z.sum((0, 2, 3))
            else:
                grad_bias = torch.ops.fastlayers.conv2d_backward_bias.default(grad_z)
        grad_input, grad_weight = _conv_grads(ctx, grad_z, input, weight)
        return grad_input, grad_weight, grad_bias, None, None, None, None

    register_autograd(
        "fastlayers::conv2d_relu_max_pool2d", _pool_backward, setup_context=_pool_setup_context
    )


# ---- public wrappers ---------------------------------------------------------------


def _prepare(input, weight, stride, padding, dilation, name):
    """Unbatched -> batched, ints -> pairs, 'same'/'valid' -> padding (asymmetric 'same'
    pads the input's bottom/right first)."""
    _check_input_dim(input, name)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    padding, extra = resolve_padding(padding, weight, stride, dilation)
    if extra != [0, 0]:
        input = F.pad(input, [0, extra[1], 0, extra[0]])
    return input, unbatched, stride, padding, dilation


def _use_kernel(name: str, input: torch.Tensor) -> bool:
    return (
        backend.use_kernels(input.device)
        and input.dtype in _KERNEL_DTYPES
        and input.device.type in _KERNEL_DEVICES[name]
    )


def _conv2d(input, weight, bias, stride, padding, dilation, groups, relu, name):
    input, unbatched, stride, padding, dilation = _prepare(input, weight, stride, padding, dilation, name)
    if _use_kernel("conv2d", input):
        out = torch.ops.fastlayers.conv2d.default(input, weight, bias, stride, padding, dilation, groups, relu)
    else:
        reference = conv2d_relu_reference if relu else conv2d_reference
        out = reference(input, weight, bias, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``torch.nn.functional.conv2d``: same signature, same result.

    ``input`` is ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``, NCHW or
    channels_last (the output is channels_last when the input or the weight is, as in
    torch); ``padding`` is an int, a pair, ``'valid'`` or ``'same'``. float32/float64
    (float16/bfloat16 compute in float32) run the kernels; other dtypes and devices
    without a kernel run the reference."""
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, False, "conv2d")


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``relu(conv2d(...))`` in one pass: the ReLU is applied as each output tile is stored."""
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, True, "conv2d_relu")


def conv2d_relu_max_pool2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``max_pool2d(relu(conv2d(...)), kernel_size=2, stride=2)`` in one pass; the
    convolution's arguments are ``conv2d``'s. The pre-pool activation is never stored
    (the backward keeps a uint8 window index instead)."""
    input, unbatched, stride, padding, dilation = _prepare(
        input, weight, stride, padding, dilation, "conv2d_relu_max_pool2d"
    )
    if _use_kernel("conv2d_relu_max_pool2d", input):
        out, _ = torch.ops.fastlayers.conv2d_relu_max_pool2d.default(
            input, weight, bias, stride, padding, dilation, groups
        )
    else:
        out = conv2d_relu_max_pool2d_reference(input, weight, bias, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``torch.nn.functional.conv1d``: the 2-D convolution with a kernel of height 1."""
    if input.dim() not in (2, 3):
        raise RuntimeError(
            f"Expected 2D (unbatched) or 3D (batched) input to conv1d, but got input of size: {list(input.shape)}"
        )
    if weight.dim() != 3:
        raise RuntimeError(f"conv1d: expected a 3-D weight (C_out, C_in / groups, k), got shape {list(weight.shape)}")

    def single(value, name):
        value = [value] if isinstance(value, int) else list(value)
        if len(value) != 1:
            raise RuntimeError(
                f"expected {name} to be a single integer value or a list of 1 values to match the "
                f"convolution dimensions, but got {name}={value}"
            )
        return int(value[0])

    padding2 = padding if isinstance(padding, str) else [0, single(padding, "padding")]
    out = conv2d(
        input.unsqueeze(-2),
        weight.unsqueeze(-2),
        bias,
        [1, single(stride, "stride")],
        padding2,
        [1, single(dilation, "dilation")],
        groups,
    )
    return out.squeeze(-2)
