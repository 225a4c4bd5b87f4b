"""Fused bias + activation: ``y = act(x + b)`` with ``b`` broadcast along dimension 1.

This is the epilogue of the convolution ops (conv + bias + ReLU) and the proof of the
op pattern every fastlayers op follows:

* ``torch.ops.fastlayers.bias_act`` / ``bias_act_backward``: C++ and CUDA kernels
  (csrc/bias_act/), schemas in csrc/registration.cpp;
* here: fake kernels (shapes and strides for torch.compile), autograd, the public
  wrapper, and the pure-PyTorch reference that is both the fallback and the oracle.

The backward saves the output ``y`` for identity/relu/tanh/sigmoid, whose derivative is
a function of ``y``, and the input ``x`` for gelu/silu, recomputing ``z = x + b``; it
never stores the pre-activation. Higher-order gradients (``create_graph=True``) run
through the reference formulas, which autograd can differentiate again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlayers import _extension, backend
from fastlayers.ops.autograd import register_autograd

ACTIVATIONS = ("identity", "relu", "gelu", "silu", "tanh", "sigmoid")
# Activations whose derivative the backward computes from the forward's output.
SAVES_OUTPUT = frozenset({"identity", "relu", "tanh", "sigmoid"})
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

def _gelu(z: torch.Tensor) -> torch.Tensor:
    # z Phi(z) through erfc: F.gelu's 1 + erf(z/sqrt2) cancels for z < -5 (float64:
    # gelu(-8) loses 2 digits, gelu(-10) comes out 0); erfc keeps full relative accuracy.
    return 0.5 * z * torch.erfc(-z * math.sqrt(0.5))


_FORWARD = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "gelu": _gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def check_args(input: torch.Tensor, bias: torch.Tensor | None, activation: str, op: str = "bias_act") -> None:
    """The checks of the C++ entry, with the same messages and exception types."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation '{activation}'; expected one of {', '.join(ACTIVATIONS)}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if bias is None:
        return
    if input.dim() < 2:
        raise RuntimeError(
            f"{op}: with a bias, input must have a channel dimension (N, C, ...), got shape {list(input.shape)}"
        )
    if bias.dim() != 1 or bias.shape[0] != input.shape[1]:
        raise RuntimeError(
            f"{op}: bias must have shape [{input.shape[1]}] (the size of input dimension 1), got {list(bias.shape)}"
        )
    if bias.device != input.device:
        raise RuntimeError(f"{op}: bias is on {bias.device} but input is on {input.device}")
    if bias.dtype != input.dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} does not match input dtype {input.dtype}")


def _bias_view(bias: torch.Tensor, ndim: int) -> torch.Tensor:
    return bias.view([1, -1] + [1] * (ndim - 2))


def _reduce_to_channels(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


def dense_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels compute and return in (csrc/common/torch_utils.h)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ---- reference ------------------------------------------------------------------


def bias_act_reference(input: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "relu") -> torch.Tensor:
    """``act(input + bias[None, :, None, ...])`` in plain PyTorch ops."""
    check_args(input, bias, activation)
    z = input if bias is None else input + _bias_view(bias, input.dim())
    return _FORWARD[activation](z)


def _activation_grad(saved: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """d act / d z from what the forward saved (the output, or the input for gelu/silu); not relu."""
    if activation == "identity":
        return torch.ones_like(saved)
    if activation == "tanh":
        return 1 - saved * saved
    if activation == "sigmoid":
        return saved * (1 - saved)
    z = saved if bias is None else saved + _bias_view(bias, saved.dim())
    if activation == "gelu":
        return 0.5 * torch.erfc(-z * math.sqrt(0.5)) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    s = torch.sigmoid(z)  # silu
    return s * (1 + z * (1 - s))


def bias_act_backward_reference(
    grad_output: torch.Tensor, saved: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_bias) in plain, differentiable PyTorch ops; grad_bias is empty without a bias."""
    check_args(saved, bias, activation, op="bias_act_backward")
    if activation == "relu":
        # threshold_backward's rule: the gradient passes where the output is not <= 0 (NaN too).
        grad_input = torch.where(saved <= 0, torch.zeros_like(grad_output), grad_output)
    else:
        grad_input = grad_output * _activation_grad(saved, bias, activation)
    grad_bias = _reduce_to_channels(grad_input) if bias is not None else saved.new_empty(0)
    return grad_input, grad_bias


# ---- torch.library registrations -------------------------------------------------

if _extension.available():

    @torch.library.register_fake("fastlayers::bias_act")
    def _bias_act_fake(input, bias, activation):
        check_args(input, bias, activation)
        return torch.empty_like(input, memory_format=dense_memory_format(input))

    @torch.library.register_fake("fastlayers::bias_act_backward")
    def _bias_act_backward_fake(grad_output, saved, bias, activation):
        check_args(saved, bias, activation, op="bias_act_backward")
        torch._check(grad_output.shape == saved.shape, lambda: "bias_act_backward: grad_output shape mismatch")
        grad_input = torch.empty_like(saved, memory_format=dense_memory_format(saved))
        grad_bias = bias.new_empty(bias.shape) if bias is not None else saved.new_empty(0)
        return grad_input, grad_bias

    def _setup_context(ctx, inputs, output):
        input, bias, activation = inputs
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(output if activation in SAVES_OUTPUT else input, bias)

    def _backward(ctx, grad_output):
        saved, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: build the gradient from differentiable reference ops.
            grad_input, grad_bias = bias_act_backward_reference(grad_output, saved, bias, ctx.activation)
        else:
            grad_input, grad_bias = torch.ops.fastlayers.bias_act_backward.default(
                grad_output, saved, bias, ctx.activation
            )
        return grad_input, (grad_bias if ctx.has_bias and ctx.needs_input_grad[1] else None), None

    register_autograd("fastlayers::bias_act", _backward, setup_context=_setup_context)


# ---- public wrapper ----------------------------------------------------------------


def bias_act(input: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "relu") -> torch.Tensor:
    """Fused ``act(input + bias)``, the bias broadcast along dimension 1 (channels).

    Args:
        input: ``(N, C, *)`` tensor, float32/float64/float16/bfloat16, any layout
            (channels_last is kept). Without a bias any shape is accepted.
        bias: optional ``(C,)`` tensor of the same dtype and device.
        activation: one of ``identity``, ``relu``, ``gelu`` (exact, erf-based), ``silu``,
            ``tanh``, ``sigmoid``.

    Differentiable in ``input`` and ``bias``; works under ``torch.compile(fullgraph=True)``.
    """
    if backend.use_kernels(input.device):
        return torch.ops.fastlayers.bias_act.default(input, bias, activation)
    return bias_act_reference(input, bias, activation)
