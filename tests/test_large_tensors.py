"""64-bit indexing: ops on tensors of more than 2^31 elements address every element.

Every CPU kernel computes offsets in int64_t (loop counters, strides and their
products); the CUDA kernels index with int64_t too and check their grid limits
(2^31 - 1 blocks along x, 65535 along y and z) with a clear error before launching.
These tests run an op whose output (forward) or grad_output and saved output
(backward) has more than 2^31 elements and compare the elements a 32-bit offset would
wrap around for with the reference: a wrapped write would leave them unwritten
(forward), a wrapped read would fetch another batch entry's data, which differs
(backward). They need up to 11 GiB of free memory, so they are marked slow and
skip when /proc/meminfo's MemAvailable is lower."""

from __future__ import annotations

import pytest
import torch

from fastlayers.functional import bias_act, conv2d, conv2d_relu, scaled_dot_product_attention
from fastlayers.ops.attention import scaled_dot_product_attention_reference
from fastlayers.ops.bias_act import bias_act_reference
from helpers import TOLERANCES, requires_extension

pytestmark = [requires_extension, pytest.mark.slow]

BEYOND_INT32 = 2**31 + 1024  # elements


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _require_memory(gib: float):
    if available_memory_bytes() < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of available memory, /proc/meminfo has {available_memory_bytes() / 2**30:.1f}")


def _pattern(begin: int, end: int) -> torch.Tensor:
    """Values in [-5, 5] that vary along the tensor: (position mod 251 - 125) / 25."""
    return torch.arange(begin, end, dtype=torch.int64).remainder_(251).sub_(125).to(torch.float32).div_(25)


def test_bias_act_beyond_two_to_the_31_elements():
    _require_memory(10)  # input and output of 4 GiB each, plus slack
    channels = 4
    x = torch.empty(1, channels, BEYOND_INT32 // channels, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    length, chunk = x.size(2), 2**26
    for begin in range(0, length, chunk):
        x[0, :, begin : begin + chunk] = _pattern(begin, min(length, begin + chunk)).to(torch.bfloat16)
    bias = torch.tensor([0.5, -1.0, 2.0, -0.25], dtype=torch.bfloat16)
    y = bias_act(x, bias, "silu")
    del x
    # The last elements of every plane (those of the last plane lie beyond element 2^31)
    # against the reference on the same values.
    tail = 4096
    xs = _pattern(length - tail, length).to(torch.bfloat16).view(1, 1, -1)
    rtol, atol = TOLERANCES[torch.bfloat16]
    for c in range(channels):
        expected = bias_act_reference(xs.double(), bias[c : c + 1].double(), "silu")
        torch.testing.assert_close(y[:, c : c + 1, -tail:].double(), expected, rtol=rtol, atol=atol)


def test_attention_output_beyond_two_to_the_31_elements():
    _require_memory(6)  # a 4 GiB bfloat16 output; the inputs are broadcast views
    batch, heads, q_len, kv_len, head_dim, value_dim = 2**19 + 1, 1, 64, 3, 8, 64
    assert batch * heads * q_len * value_dim > 2**31
    gen = torch.Generator().manual_seed(0)
    q1 = torch.randn(1, heads, q_len, head_dim, generator=gen).to(torch.bfloat16)
    k1 = torch.randn(1, heads, kv_len, head_dim, generator=gen).to(torch.bfloat16)
    v1 = torch.randn(1, heads, kv_len, value_dim, generator=gen).to(torch.bfloat16)
    # Every batch entry is the same (stride 0): each must produce the same output rows.
    q = q1.expand(batch, -1, -1, -1)
    k = k1.expand(batch, -1, -1, -1)
    v = v1.expand(batch, -1, -1, -1)
    out = scaled_dot_product_attention(q, k, v)
    assert out.numel() > 2**31
    expected = scaled_dot_product_attention_reference(q1.double(), k1.double(), v1.double())
    rtol, atol = TOLERANCES[torch.bfloat16]
    for b in (0, batch // 2, batch - 2, batch - 1):
        torch.testing.assert_close(out[b : b + 1].double(), expected, rtol=rtol, atol=atol)
    assert torch.equal(out[0], out[-1])


@pytest.mark.parametrize("fused", [False, True], ids=["conv2d", "conv2d_relu"])
def test_conv2d_output_beyond_two_to_the_31_elements(fused):
    _require_memory(11)  # an 8 GiB float32 output, the input's padded copy (~150 MiB)
    batch, out_channels, size = 2**15 + 1, 64, 32
    assert batch * out_channels * size * size > 2**31
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 1, size, size, generator=gen)
    w = torch.randn(out_channels, 1, 3, 3, generator=gen)
    b = torch.randn(out_channels, generator=gen)
    # Every image is the same, so every output image must equal the single image's output;
    # channels_last keeps the output in the kernel's own layout (no 8 GiB conversion copy).
    x = x1.expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    y = (conv2d_relu if fused else conv2d)(x, w, b, padding=1)
    del x
    assert y.numel() > 2**31
    expected = torch.nn.functional.conv2d(x1.double(), w.double(), b.double(), padding=1)
    if fused:
        expected = expected.relu()
    rtol, atol = TOLERANCES[torch.float32]
    for i in (0, batch // 2, batch - 2, batch - 1):
        torch.testing.assert_close(y[i : i + 1].double(), expected, rtol=rtol, atol=atol)


def test_attention_backward_beyond_two_to_the_31_elements():
    _require_memory(9)  # the 4 GiB bfloat16 output, per-entry values and gradients (~2.5 GiB)
    batch, heads, q_len, kv_len, head_dim, value_dim = 2**19 + 1, 1, 64, 3, 8, 64
    gen = torch.Generator().manual_seed(0)
    q1 = torch.randn(1, heads, q_len, head_dim, generator=gen).to(torch.bfloat16)
    k1 = torch.randn(1, heads, kv_len, head_dim, generator=gen).to(torch.bfloat16)
    g1 = torch.randn(1, heads, q_len, value_dim, generator=gen).to(torch.bfloat16)
    q = q1.expand(batch, -1, -1, -1)
    k = k1.expand(batch, -1, -1, -1)
    g = g1.expand(batch, -1, -1, -1)  # grad_output: a stride-0 view, read in place
    # The values differ per batch entry, so the output (beyond 2^31 elements) does too,
    # and a wrapped 32-bit offset into it would read another entry's rows.
    v = torch.randn(batch, heads, kv_len, value_dim, generator=gen).to(torch.bfloat16)
    scale = head_dim**-0.5
    out, lse = torch.ops.fastlayers.flash_attention.default(q, k, v, None, False, scale)
    assert out.numel() > 2**31
    grad_q, grad_k, grad_v = torch.ops.fastlayers.flash_attention_backward.default(
        g, q, k, v, out, lse, None, False, scale
    )
    del out, lse
    for b in (0, batch // 2, batch - 2, batch - 1):
        # The same entry as a batch of one (small offsets only): the kernels sum in an
        # order that depends on the shape within an entry, never on the batch, so the
        # gradients must be the same bits. (That call's accuracy against the float64
        # reference is what the rest of the suite checks.)
        v_b = v[b : b + 1].clone()
        out_b, lse_b = torch.ops.fastlayers.flash_attention.default(q1, k1, v_b, None, False, scale)
        single = torch.ops.fastlayers.flash_attention_backward.default(g1, q1, k1, v_b, out_b, lse_b, None, False, scale)
        for name, actual, expected in zip(("query", "key", "value"), (grad_q, grad_k, grad_v), single):
            assert torch.equal(actual[b : b + 1], expected), f"grad_{name} of batch entry {b} differs"
        # ... and the computation is the real one: close to the float64 reference.
        qd, kd, vd = (t.double().requires_grad_(True) for t in (q1, k1, v_b))
        reference = torch.autograd.grad(scaled_dot_product_attention_reference(qd, kd, vd, scale=scale), (qd, kd, vd), g1.double())
        for actual, expected in zip((grad_q, grad_k, grad_v), reference):
            torch.testing.assert_close(actual[b : b + 1].double(), expected, rtol=0.05, atol=0.05)


def test_conv2d_backward_beyond_two_to_the_31_elements():
    _require_memory(11)  # an 8 GiB float32 grad_output (channels_last: read in place)
    batch, out_channels, size = 2**15 + 1, 64, 32
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 1, size, size, generator=gen)
    w = torch.randn(out_channels, 1, 1, 1, generator=gen)  # 1x1, no padding: no padded copy
    g1 = torch.randn(1, out_channels, size, size, generator=gen)
    x = x1.expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    # grad_output is zero except three images scaled by 1, 2 and 3; the last one lies
    # beyond element 2^31, and a wrapped offset would read image 0 (factor 1) instead.
    g = torch.empty(batch, out_channels, size, size, memory_format=torch.channels_last).zero_()
    assert g.numel() > 2**31
    factors = {0: 1.0, batch // 2: 2.0, batch - 1: 3.0}
    for i, f in factors.items():
        g[i].copy_(g1[0] * f)
    args = ([1, 1], [0, 0], [1, 1], 1)
    grad_input = torch.ops.fastlayers.conv2d_backward_input.default(g, w, list(x.shape), *args)
    grad_weight = torch.ops.fastlayers.conv2d_backward_weight.default(g, x, list(w.shape), *args)
    grad_bias = torch.ops.fastlayers.conv2d_backward_bias.default(g)
    del g
    xd, wd = x1.double().requires_grad_(True), w.double().requires_grad_(True)
    bd = torch.zeros(out_channels, dtype=torch.float64, requires_grad=True)
    single = torch.autograd.grad(torch.nn.functional.conv2d(xd, wd, bd), (xd, wd, bd), g1.double())
    # float32 sums of 64 (grad_input) and 3 x 1024 (grad_weight, grad_bias) products:
    # a wrapped offset would change a result by a factor (1 instead of 3), far outside.
    rtol, atol = 1e-4, 1e-4
    for i in (0, 1, batch // 2, batch - 2, batch - 1):
        expected = single[0] * factors.get(i, 0.0)
        torch.testing.assert_close(grad_input[i : i + 1].double(), expected, rtol=rtol, atol=atol)
    total = sum(factors.values())
    torch.testing.assert_close(grad_weight.double(), single[1] * total, rtol=rtol, atol=atol * total)
    torch.testing.assert_close(grad_bias.double(), single[2] * total, rtol=rtol, atol=atol * total)
