"""Convolution modules: drop-in ``Conv2d`` / ``Conv1d`` and the fused blocks.

``Conv2d`` and ``Conv1d`` subclass their ``torch.nn`` twins and replace only the
convolution call, so the constructor, parameter names, initialisation, ``state_dict``,
``extra_repr`` and ``padding_mode`` handling are torch's own; a model keeps working
(and ``isinstance(m, torch.nn.Conv2d)`` holds) after a swap. ``Conv2dReLU`` and
``Conv2dReLUMaxPool2d`` take ``Conv2d``'s arguments and hold the same ``weight`` and
``bias``, so ``load_state_dict`` moves between them and a ``torch.nn.Conv2d``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastlayers.ops.conv2d import conv1d, conv2d, conv2d_relu, conv2d_relu_max_pool2d


def conv_constructor_args(module: nn.Conv1d | nn.Conv2d) -> dict:
    """The constructor arguments (all but device and dtype) that rebuild ``module``'s
    hyperparameters, for torch.nn.Conv1d/Conv2d, their fastlayers twins and the fused
    blocks."""
    return dict(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )


def _from_torch(cls, module: nn.Module, twin: type):
    if not isinstance(module, twin):
        raise TypeError(f"{cls.__name__}.from_torch expects a {twin.__module__}.{twin.__qualname__}, got {type(module)}")
    out = cls(**conv_constructor_args(module), device=module.weight.device, dtype=module.weight.dtype)
    out.load_state_dict(module.state_dict())
    out.train(module.training)
    return out


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` computed by ``fastlayers.functional.conv2d``."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_torch(cls, module: nn.Conv2d) -> "Conv2d":
        """A copy of ``module`` (hyperparameters, parameters, device, dtype, training mode)."""
        return _from_torch(cls, module, nn.Conv2d)


class Conv1d(nn.Conv1d):
    """``torch.nn.Conv1d`` computed by ``fastlayers.functional.conv1d`` (a 2-D kernel of height 1)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv1d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv1d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_torch(cls, module: nn.Conv1d) -> "Conv1d":
        """A copy of ``module`` (hyperparameters, parameters, device, dtype, training mode)."""
        return _from_torch(cls, module, nn.Conv1d)


class _FusedConv2d(nn.Conv2d):
    _fused = staticmethod(conv2d_relu)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._fused(input, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return self._fused(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_torch(cls, module: nn.Conv2d):
        """The fused block with ``module``'s hyperparameters and parameters."""
        return _from_torch(cls, module, nn.Conv2d)


class Conv2dReLU(_FusedConv2d):
    """``relu(Conv2d(...)(x))`` in one op; ``Conv2d``'s arguments, parameters ``weight`` and ``bias``."""

    _fused = staticmethod(conv2d_relu)


class Conv2dReLUMaxPool2d(_FusedConv2d):
    """``max_pool2d(relu(Conv2d(...)(x)), 2, 2)`` in one op; ``Conv2d``'s arguments,
    parameters ``weight`` and ``bias``. The pre-pool activation is never stored."""

    _fused = staticmethod(conv2d_relu_max_pool2d)
