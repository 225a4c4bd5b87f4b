"""Shared test helpers: devices, dtypes, tolerances, parity checks.

Tolerances are per dtype and apply to a comparison against a float64 oracle (the
reference op run in float64, cast back). For low precision, `assert_no_worse_than_torch`
adds the flash-attention rule: our error against the oracle may be at most twice
native PyTorch's own error in that dtype (plus a small floor).
"""

from __future__ import annotations

import pytest
import torch

from fastlayers import _extension

# (rtol, atol) against the float64 oracle.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

requires_extension = pytest.mark.skipif(
    not _extension.available(), reason=f"fastlayers extension not built: {_extension.load_error}"
)
requires_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.has_kernels("cuda")),
    reason="needs a visible CUDA device and fastlayers built with CUDA kernels",
)


def devices() -> list:
    """'cpu', and 'cuda' as a param that skips cleanly where there is no GPU."""
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda_kernels])]


def cpu_isas() -> list[str]:
    return list(_extension._C.available_cpu_isas()) if _extension.available() else []


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), oracle.double(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{msg}\n{m}"
    )


def assert_no_worse_than_torch(
    actual: torch.Tensor, native: torch.Tensor, oracle: torch.Tensor, floor: float = 1e-6
) -> None:
    """max|actual - oracle| <= 2 * max|native - oracle| + floor, over finite entries."""
    finite = torch.isfinite(oracle)
    ours = (actual.double() - oracle.double())[finite].abs().max().item() if finite.any() else 0.0
    theirs = (native.double() - oracle.double())[finite].abs().max().item() if finite.any() else 0.0
    assert ours <= 2 * theirs + floor, f"error {ours:.3g} vs torch's own {theirs:.3g}"


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t` laid out as `layout`: contiguous, channels_last, channels_last_3d, strided
    (a non-dense view of the same values) or expanded (t[0] broadcast along dim 0, stride 0)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":
        # Every other element of a twice-as-long last dimension.
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded":
        return t[:1].expand(t.shape)
    raise ValueError(layout)
