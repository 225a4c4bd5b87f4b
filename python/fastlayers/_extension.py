"""Loads the compiled extension once, at import, and says which devices have kernels.

When the extension is missing or was built for another torch (an ABI mismatch shows
up as an ImportError with an undefined symbol), fastlayers still imports: every op
falls back to its pure-PyTorch reference and a warning says why.
"""

from __future__ import annotations

import warnings

import torch

_C = None
load_error: str | None = None

try:
    from fastlayers import _C  # noqa: F811  (registers the fastlayers:: ops with torch)
except (ImportError, OSError) as exc:  # OSError: a shared library could not be loaded
    load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "fastlayers: the compiled extension could not be loaded, so every op runs its "
        f"pure-PyTorch reference implementation ({load_error}). Rebuild with "
        "`pip install --no-build-isolation .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )

BUILD_INFO: dict = dict(_C.build_info()) if _C is not None else {}

if _C is not None:
    _built = BUILD_INFO["torch_version"]
    _running = torch.__version__.split("+")[0]
    if _built.split(".")[:2] != _running.split(".")[:2]:
        warnings.warn(
            f"fastlayers was built against torch {_built} but torch {_running} is installed; "
            "rebuild fastlayers if its ops misbehave.",
            RuntimeWarning,
            stacklevel=2,
        )


def available() -> bool:
    """True when the compiled extension is loaded."""
    return _C is not None


def has_kernels(device_type: str) -> bool:
    """True when the extension has kernels for `device_type` ('cpu', 'cuda', ...)."""
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(BUILD_INFO["cuda"])
    return False
