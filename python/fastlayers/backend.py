"""The global switch between the compiled kernels and the pure-PyTorch references.

``"kernels"`` (the default) runs the compiled kernels wherever the extension has them
for the tensors' device and falls back to the reference elsewhere; ``"reference"``
always runs the reference. The switch is process-wide, like ``torch.backends`` flags;
a compiled graph (``torch.compile``) is re-traced when it changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastlayers import _extension

BACKENDS = ("kernels", "reference")

_backend = "kernels"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastlayers backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Select ``"kernels"`` or ``"reference"`` for every fastlayers op."""
    global _backend
    _backend = _check(name)


def get_backend() -> str:
    """The backend selected now."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed code with backend `name`, then restore the previous one."""
    global _backend
    previous = _backend
    _backend = _check(name)
    try:
        yield
    finally:
        _backend = previous


def use_kernels(device: torch.device) -> bool:
    """Whether an op on `device` runs the compiled kernel (else its reference)."""
    return _backend == "kernels" and _extension.has_kernels(device.type)
