"""Flash attention: fastlayers::flash_attention(_backward) and
fastlayers.functional.scaled_dot_product_attention, against the float64 reference and
torch's SDPA (math backend)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastlayers
from fastlayers import _extension
from fastlayers.functional import scaled_dot_product_attention as sdpa
from fastlayers.ops.attention import (
    draw_dropout_seed,
    dropout_factors_reference,
    flash_attention_backward_reference,
    flash_attention_reference,
    lse_dtype,
    philox4x32_10,
    scaled_dot_product_attention_reference,
)
from helpers import assert_no_worse_than_torch, devices, requires_cuda_kernels, requires_extension

pytestmark = requires_extension

flash = torch.ops.fastlayers.flash_attention.default if _extension.available() else None
flash_backward = torch.ops.fastlayers.flash_attention_backward.default if _extension.available() else None

# Relative to the largest |oracle| entry: attention sums L*E products, so its absolute
# error scales with the magnitude of the result, not with each entry.
RTOL = {torch.float32: 4e-6, torch.float64: 1e-13}


def assert_close_scaled(actual, oracle, dtype, msg=""):
    finite = oracle[torch.isfinite(oracle)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), oracle.double(), rtol=0, atol=RTOL[dtype] * max(scale, 1.0), msg=lambda m: f"{msg}\n{m}"
    )


def native_sdpa(*args, **kwargs):
    """torch's SDPA on the math backend, the ground truth."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _qkv(B, H, Hkv, Lq, Lk, E, Ev, dtype, device="cpu"):
    q = torch.randn(B, H, Lq, E, dtype=torch.float64, device=device).to(dtype)
    k = torch.randn(B, Hkv, Lk, E, dtype=torch.float64, device=device).to(dtype)
    v = torch.randn(B, Hkv, Lk, Ev, dtype=torch.float64, device=device).to(dtype)
    return q, k, v


def _mask(kind, shape, dtype, device="cpu"):
    if kind is None:
        return None
    keep = torch.rand(shape, device=device) > 0.3
    if kind == "bool":
        return keep
    additive = torch.randn(shape, dtype=torch.float64, device=device)
    return additive.masked_fill(~keep, float("-inf")).to(dtype)


def _op_oracle(q, k, v, mask, causal, scale, grad_out, dropout_p=0.0, dropout_seed=None):
    """Forward (output, lse) and the three gradients in float64 from the same inputs."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    md = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    out, lse = flash_attention_reference(qd, kd, vd, md, causal, scale, dropout_p, dropout_seed)
    out.backward(grad_out.double())
    return out, lse, qd.grad, kd.grad, vd.grad


# ---- the op: forward and backward against the float64 reference ------------------------

# (B, H, Hkv, Lq, Lk, E, Ev, causal, mask kind, mask shape)
OP_CASES = [
    (2, 4, 2, 70, 133, 64, 48, False, "bool", (1, 4, 70, 133)),
    (1, 2, 1, 5, 3, 8, 8, True, None, None),
    (1, 1, 1, 130, 100, 256, 256, True, None, None),
    (2, 2, 2, 65, 129, 17, 33, False, "float", (65, 1)),
    (1, 3, 3, 1, 1, 16, 16, False, None, None),
    (2, 8, 1, 64, 64, 32, 32, True, None, None),
    (1, 2, 2, 33, 200, 100, 20, False, "float", (1, 2, 1, 200)),
    (1, 2, 2, 100, 37, 12, 12, True, None, None),
]
OP_IDS = [
    f"{c[0]}x{c[1]}/{c[2]}x{c[3]}x{c[4]}-E{c[5]}-Ev{c[6]}-{'causal' if c[7] else 'full'}-{c[8]}" for c in OP_CASES
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
def test_op_forward_and_backward_match_float64_reference(case, dtype, device):
    B, H, Hkv, Lq, Lk, E, Ev, causal, kind, mshape = case
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, E, Ev, dtype, device)
    mask = _mask(kind, mshape, dtype, device)
    scale = 1 / math.sqrt(E)
    out, lse = flash(q, k, v, mask, causal, scale)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, mask, causal, scale)
    o_ref, lse_ref, *grads_ref = _op_oracle(q, k, v, mask, causal, scale, grad_out)
    assert lse.dtype == lse_dtype(dtype) and lse.shape == (B, H, Lq)
    assert_close_scaled(out, o_ref, dtype, "output")
    assert_close_scaled(lse, lse_ref, dtype, "logsumexp")
    for name, g, g_ref in zip(("query", "key", "value"), grads, grads_ref):
        assert g.shape == g_ref.shape
        assert_close_scaled(g, g_ref, dtype, f"grad_{name}")


@pytest.mark.parametrize("case", OP_CASES[:4], ids=OP_IDS[:4])
def test_every_cpu_isa_computes_the_same_result(cpu_isa, case):
    B, H, Hkv, Lq, Lk, E, Ev, causal, kind, mshape = case
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, E, Ev, torch.float32)
    mask = _mask(kind, mshape, torch.float32)
    scale = 1 / math.sqrt(E)
    out, lse = flash(q, k, v, mask, causal, scale)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, mask, causal, scale)
    o_ref, _, *grads_ref = _op_oracle(q, k, v, mask, causal, scale, grad_out)
    assert_close_scaled(out, o_ref, torch.float32, cpu_isa)
    for g, g_ref in zip(grads, grads_ref):
        assert_close_scaled(g, g_ref, torch.float32, cpu_isa)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", OP_CASES[:4], ids=OP_IDS[:4])
def test_low_precision_error_is_at_most_twice_torchs(case, dtype, device):
    """float32 accumulation: no more than 2x the error of torch's SDPA in the same dtype."""
    B, H, Hkv, Lq, Lk, E, Ev, causal, kind, mshape = case
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, E, Ev, dtype, device)
    mask = _mask(kind, mshape, dtype, device)
    scale = 1 / math.sqrt(E)
    q_, k_, v_ = (t.requires_grad_() for t in (q, k, v))
    ours = sdpa(q_, k_, v_, mask, is_causal=causal, scale=scale, enable_gqa=True)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q_, k_, v_), grad_out)
    native = native_sdpa(q_, k_, v_, mask, is_causal=causal, scale=scale, enable_gqa=True)
    native_grads = torch.autograd.grad(native, (q_, k_, v_), grad_out)
    o_ref, _, *grads_ref = _op_oracle(q, k, v, mask, causal, scale, grad_out)
    assert ours.dtype == dtype
    assert_no_worse_than_torch(ours, native, o_ref, floor=1e-3)
    for g, g_native, g_ref in zip(ours_grads, native_grads, grads_ref):
        assert_no_worse_than_torch(g, g_native, g_ref, floor=1e-3)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda_kernels])])
def test_cuda_backward_is_bitwise_reproducible(device):
    q, k, v = _qkv(2, 4, 2, 150, 170, 32, 32, torch.float32, device)
    out, lse = flash(q, k, v, None, True, 0.2)
    grad_out = torch.randn_like(out)
    first = flash_backward(grad_out, q, k, v, out, lse, None, True, 0.2)
    second = flash_backward(grad_out, q, k, v, out, lse, None, True, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda_kernels])])
def test_cuda_head_dims_above_256_run_the_reference(device):
    q = torch.randn(1, 2, 20, 320, device=device)
    k, v = torch.randn(1, 2, 30, 320, device=device), torch.randn(1, 2, 30, 320, device=device)
    with pytest.raises(RuntimeError, match="head and value dims up to 256"):
        flash(q, k, v, None, False, 0.1)
    _check_sdpa_parity(q, k, v, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "B, H, Hkv, causal, kind",
    # B * Hkv = 1 takes the fused backward on one thread and the split passes on two.
    [(2, 4, 2, False, None), (1, 3, 1, True, None), (1, 2, 1, False, "float"), (1, 1, 1, False, "bool")],
)
def test_backward_gives_the_same_bits_for_any_thread_count(B, H, Hkv, causal, kind, dtype):
    q, k, v = _qkv(B, H, Hkv, 150, 170, 40, 24, dtype)
    mask = _mask(kind, (150, 170), dtype)
    out, lse = flash(q, k, v, mask, causal, 0.2)
    grad_out = torch.randn_like(out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = flash_backward(grad_out, q, k, v, out, lse, mask, causal, 0.2)
        torch.set_num_threads(max(2, threads))
        many = flash_backward(grad_out, q, k, v, out, lse, mask, causal, 0.2)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_strided_and_broadcast_inputs_give_the_dense_result():
    """(B, L, H, E) transposed to (B, H, L, E), a strided last dimension and a stride-0 batch."""
    base = torch.randn(2, 70, 4, 32)
    q = base.transpose(1, 2)  # rows contiguous, heads interleaved
    k = torch.randn(2, 4, 90, 64)[..., ::2]  # last dimension strided: copied
    v = torch.randn(1, 4, 90, 16).expand(2, 4, 90, 16)  # batch broadcast, stride 0
    out, lse = flash(q, k, v, None, True, 0.25)
    ref_out, ref_lse = flash(q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.25)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("keys", [88, 90, 128])
def test_keys_and_values_read_in_place_give_the_dense_result(keys):
    """float32 K and V tiles are read in place (rows strided as (B, L, H, E) transposed
    to (B, H, L, E)); a last block of 24 keys is read in place too, one of 26 is copied."""
    q = torch.randn(2, 4, 70, 32)
    k = torch.randn(2, keys, 4, 32).transpose(1, 2)
    v = torch.randn(2, keys, 4, 64).transpose(1, 2)
    for causal in (False, True):
        out, lse = flash(q, k, v, None, causal, 0.25)
        ref_out, ref_lse = flash(q, k.contiguous(), v.contiguous(), None, causal, 0.25)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), is_causal=causal, scale=0.25
        )
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(88, 88), (70, 90), (128, 130)])
def test_gradients_with_tiles_read_in_place_match_the_dense_result(lengths):
    """The backward reads float32 K, V and dO rows in place where it can (strided rows
    here), and copies partial blocks whose padded rows do not exist."""
    queries, keys = lengths
    q = torch.randn(2, queries, 4, 32).transpose(1, 2)
    k = torch.randn(2, keys, 4, 32).transpose(1, 2)
    v = torch.randn(2, keys, 4, 32).transpose(1, 2)
    grad = torch.randn(2, queries, 4, 32).transpose(1, 2)
    for causal in (False, True):
        strided = [t.clone().requires_grad_() for t in (q, k, v)]
        dense = [t.contiguous().requires_grad_() for t in (q, k, v)]
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        got = torch.autograd.grad(sdpa(*strided, is_causal=causal), strided, grad)
        want = torch.autograd.grad(sdpa(*dense, is_causal=causal), dense, grad.contiguous())
        oracle = torch.autograd.grad(F.scaled_dot_product_attention(*exact, is_causal=causal), exact, grad.double())
        for a, b, c in zip(got, want, oracle):
            assert torch.equal(a, b)
            torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_rows_that_see_no_key_give_zero_output_and_gradients_as_torch(device):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 6, 9, 8, 8, torch.float64, device))
    mask = torch.rand(6, 9, device=device) > 0.4
    mask[2] = False
    mask[5] = False
    ours = sdpa(q, k, v, mask)
    native = native_sdpa(q, k, v, mask)
    assert torch.equal(ours[:, :, 2], torch.zeros_like(ours[:, :, 2]))
    torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-13)
    grads = torch.autograd.grad(ours.sum(), (q, k, v))
    native_grads = torch.autograd.grad(native.sum(), (q, k, v))
    for g, n in zip(grads, native_grads):
        torch.testing.assert_close(g, n, rtol=1e-12, atol=1e-13)
    _, lse = flash(q.detach(), k.detach(), v.detach(), mask, False, 0.5)
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(lse[:, :, 0]).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("where", ["query", "key", "value", "key inf"])
def test_nan_and_infinity_propagate_as_in_torch(where, device):
    q, k, v = (t.clone() for t in _qkv(1, 2, 2, 70, 90, 16, 16, torch.float32, device))
    target = {"query": q, "key": k, "value": v, "key inf": k}[where]
    target[0, 1, 5, 3] = float("inf") if where == "key inf" else float("nan")
    for causal in (False, True):
        ours, native = sdpa(q, k, v, is_causal=causal), native_sdpa(q, k, v, is_causal=causal)
        expected_nan = torch.isnan(native)
        if causal and where.startswith("key"):
            # Key 5 is hidden from queries 0..4: they never read it (torch's fused CPU
            # kernel neither), while the math backend adds the causal mask as a -inf
            # bias to the NaN scores and spreads the NaN to them.
            expected_nan[..., :5, :] = False
        assert torch.equal(torch.isnan(ours), expected_nan)
        assert expected_nan.any()
        finite = ~torch.isnan(native)
        assert_close_scaled(ours[finite], native[finite], torch.float32)


def test_empty_key_sequence_gives_zeros_and_empty_query_an_empty_output():
    q, k, v = _qkv(1, 2, 2, 5, 0, 8, 8, torch.float32)
    out = sdpa(q, k, v)
    assert torch.equal(out, native_sdpa(q, k, v))
    q, k, v = _qkv(1, 2, 2, 0, 4, 8, 8, torch.float32)
    assert sdpa(q, k, v).shape == (1, 2, 0, 8)


def test_float32_probabilities_are_accurate_over_the_whole_logit_range(cpu_isa):
    # Each query sees two keys with logits 0 and x (q = [x, 0, ...], k0 = 0, k1 = e_0,
    # scale 1) and the values are the unit vectors, so its output is the softmax
    # (1 / (1 + e^x), e^x / (1 + e^x)): the kernel's exp (csrc/common/math.h,
    # exp_nonpositive) against float64 over x from -90 to 0. Within 4 ulp (exp <= 1.4 ulp,
    # then the sum, its reciprocal and the product round once each); for x < -87.33
    # (e^x < 1.183e-38, about FLT_MIN) the probability flushes to 0.
    x = torch.cat([torch.linspace(-90.0, 0.0, 200_003), torch.tensor([-87.34, -87.33, -87.32, -1e-30, -0.0, 0.0])])
    q = torch.zeros(1, 1, x.numel(), 16)
    q[0, 0, :, 0] = x
    k = torch.zeros(1, 1, 2, 16)
    k[0, 0, 1, 0] = 1.0
    v = torch.eye(2).view(1, 1, 2, 2)
    for query in (q, q.transpose(1, 2).contiguous().transpose(1, 2)):  # and non-contiguous rows
        out = sdpa(query, k, v, scale=1.0)[0, 0].double()
        e = x.double().exp()
        expected = torch.stack([1 / (1 + e), e / (1 + e)], dim=1)
        torch.testing.assert_close(out, expected, rtol=4 * 2**-24, atol=1.19e-38)

# ---- the functional: parity with torch's SDPA ---------------------------------------------

# (query shape, key shape, value shape, enable_gqa): head dims 8..256, lengths 1..300,
# leading dimensions as torch accepts them (none, 3-D, 5-D, broadcast batch), GQA ratios.
SDPA_SHAPES = [
    ((2, 4, 37, 8), (2, 4, 53, 8), (2, 4, 53, 8), False),
    ((1, 8, 300, 64), (1, 8, 300, 64), (1, 8, 300, 64), False),
    ((1, 2, 65, 128), (1, 2, 70, 128), (1, 2, 70, 96), False),
    ((1, 1, 20, 256), (1, 1, 130, 256), (1, 1, 130, 256), False),
    ((1, 8, 50, 16), (1, 2, 61, 16), (1, 2, 61, 16), True),   # GQA 4
    ((2, 6, 33, 24), (2, 3, 33, 24), (2, 3, 33, 24), True),   # GQA 2
    ((1, 8, 17, 32), (1, 1, 40, 32), (1, 1, 40, 32), True),   # GQA 8 (multi-query)
    ((1, 4, 17, 32), (1, 1, 40, 32), (1, 1, 40, 32), False),  # heads broadcast
    ((37, 40), (29, 40), (29, 40), False),                    # 2-D
    ((3, 1, 40), (3, 7, 40), (3, 7, 20), False),              # 3-D, Lq = 1
    ((2, 3, 2, 30, 16), (2, 3, 2, 45, 16), (2, 3, 2, 45, 16), False),  # 5-D
    ((2, 4, 9, 16), (1, 4, 12, 16), (1, 4, 12, 16), False),   # batch broadcast
]
SDPA_IDS = [
    "q" + "x".join(map(str, s[0])) + "-k" + "x".join(map(str, s[1])) + ("-gqa" if s[3] else "") for s in SDPA_SHAPES
]


def _check_sdpa_parity(q, k, v, dtype, **kwargs):
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    ours = sdpa(q, k, v, **kwargs)
    native = native_sdpa(q, k, v, **kwargs)
    assert ours.shape == native.shape and ours.dtype == native.dtype
    assert_close_scaled(ours, native, dtype, "output")
    grad_out = torch.randn_like(native)
    grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    native_grads = torch.autograd.grad(native, (q, k, v), grad_out)
    for name, g, n in zip(("query", "key", "value"), grads, native_grads):
        assert g.shape == n.shape
        assert_close_scaled(g, n, dtype, f"grad_{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shapes", SDPA_SHAPES, ids=SDPA_IDS)
def test_sdpa_matches_torch(shapes, is_causal, dtype):
    qs, ks, vs, gqa = shapes
    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(vs)
    _check_sdpa_parity(q, k, v, dtype, is_causal=is_causal, enable_gqa=gqa)


def _broadcast_mask_shapes(B, H, Lq, Lk):
    """Every shape that broadcasts to (B, H, Lq, Lk): each dimension full or 1, 2-D and 3-D too."""
    shapes = []
    for bits in range(16):
        full = (B, H, Lq, Lk)
        shapes.append(tuple(full[d] if bits >> d & 1 else 1 for d in range(4)))
    return shapes + [(Lq, Lk), (1, Lk), (Lq, 1), (H, Lq, Lk), (1, Lq, Lk), (Lk,)]


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", _broadcast_mask_shapes(2, 3, 19, 70), ids=str)
def test_sdpa_masks_of_every_broadcast_shape_match_torch(mask_shape, kind):
    q, k, v = torch.randn(2, 3, 19, 24), torch.randn(2, 3, 70, 24), torch.randn(2, 3, 70, 24)
    mask = _mask(kind, mask_shape, torch.float32)
    if kind == "bool":
        mask[..., 0] = True  # keep a visible key in most rows; fully masked rows are tested apart
    _check_sdpa_parity(q, k, v, torch.float32, attn_mask=mask)


def test_sdpa_mask_with_5d_inputs_and_gqa():
    q, k, v = torch.randn(2, 2, 4, 21, 16), torch.randn(2, 2, 2, 35, 16), torch.randn(2, 2, 2, 35, 16)
    mask = torch.rand(2, 1, 1, 21, 35) > 0.2
    _check_sdpa_parity(q, k, v, torch.float64, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("scale", [0.0, 0.05, 2.0])
def test_sdpa_explicit_scale_matches_torch(scale):
    q, k, v = torch.randn(1, 2, 33, 16), torch.randn(1, 2, 47, 16), torch.randn(1, 2, 47, 16)
    _check_sdpa_parity(q, k, v, torch.float64, scale=scale, is_causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("L, E", [(1024, 64), (2048, 128), (1500, 256)])
def test_sdpa_long_sequences_match_torch(L, E, is_causal):
    q, k, v = torch.randn(1, 2, L, E), torch.randn(1, 2, L + 3, E), torch.randn(1, 2, L + 3, E)
    _check_sdpa_parity(q, k, v, torch.float32, is_causal=is_causal)


def test_float_mask_that_requires_grad_gets_torchs_gradient():
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    mask = torch.randn(9, 11, requires_grad=True)
    ours = torch.autograd.grad(sdpa(q, k, v, mask).sum(), mask)[0]
    native = torch.autograd.grad(native_sdpa(q, k, v, mask).sum(), mask)[0]
    torch.testing.assert_close(ours, native)


def test_reference_backend_gives_the_same_result():
    q, k, v = torch.randn(1, 4, 45, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    ours = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    with fastlayers.use_backend("reference"):
        ref = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    assert_close_scaled(ours, ref, torch.float32)
    torch.testing.assert_close(ref, scaled_dot_product_attention_reference(q, k, v, is_causal=True, enable_gqa=True))


# ---- gradcheck, opcheck, compile ----------------------------------------------------------


@pytest.mark.parametrize(
    "B, H, Hkv, Lq, Lk, E, Ev, causal, kind",
    [(1, 2, 1, 5, 7, 4, 3, False, "bool"), (2, 2, 2, 7, 4, 3, 5, True, None), (1, 1, 1, 3, 9, 6, 2, False, "float")],
)
def test_gradcheck_float64(B, H, Hkv, Lq, Lk, E, Ev, causal, kind):
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, Hkv, Lq, Lk, E, Ev, torch.float64))
    mask = _mask(kind, (Lq, Lk), torch.float64)
    if mask is not None:
        mask[:, 0] = True if kind == "bool" else 0.0

    def fn(q, k, v):
        return sdpa(q, k, v, mask, is_causal=causal, enable_gqa=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal, kind", [(False, "bool"), (True, None), (False, "float")])
def test_differentiable_backward_reference_matches_the_kernel(causal, kind):
    """The create_graph path (flash_attention_backward_reference) against the kernel backward."""
    q, k, v = _qkv(2, 4, 2, 37, 45, 16, 12, torch.float64)
    mask = _mask(kind, (1, 4, 37, 45), torch.float64)
    if mask is not None:
        mask[..., 0] = True if kind == "bool" else 0.0
        mask[..., 3, :] = False if kind == "bool" else float("-inf")  # a row that sees no key
    out, lse = flash(q, k, v, mask, causal, 0.3)
    grad_out = torch.randn_like(out)
    kernel = flash_backward(grad_out, q, k, v, out, lse, mask, causal, 0.3)
    reference = flash_attention_backward_reference(grad_out, q, k, v, mask, causal, 0.3)
    for a, b in zip(kernel, reference):
        assert_close_scaled(a, b, torch.float64)


def test_op_refuses_a_mask_gradient():
    q, k, v = _qkv(1, 1, 1, 3, 4, 8, 8, torch.float32)
    mask = torch.zeros(3, 4, requires_grad=True)
    out, _ = flash(q, k, v, mask, False, 0.3)
    with pytest.raises(RuntimeError, match="gradient with respect to attn_mask"):
        out.sum().backward()


@pytest.mark.parametrize("kind, causal", [(None, False), ("bool", False), ("float", False), (None, True)])
def test_opcheck(kind, causal):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 9, 13, 8, 6, torch.float32))
    mask = _mask(kind, (1, 4, 9, 13), torch.float32)
    if mask is not None:
        mask[..., 0] = True if kind == "bool" else 0.0
    torch.library.opcheck(flash, (q, k, v, mask, causal, 0.4))
    out, lse = flash(q.detach(), k.detach(), v.detach(), mask, causal, 0.4)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(flash_backward, (grad_out, q.detach(), k.detach(), v.detach(), out, lse, mask, causal, 0.4))


def test_compile_fullgraph_forward_and_backward():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 30, 41, 16, 16, torch.float32))
    mask = torch.rand(30, 41) > 0.2
    mask[:, 0] = True

    def fn(q, k, v):
        return sdpa(q, k, v, mask, enable_gqa=True).sin().sum()

    compiled = torch.compile(fn, fullgraph=True)
    eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
    graph = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(eager, graph):
        torch.testing.assert_close(a, b)


# ---- errors --------------------------------------------------------------------------------


def test_sdpa_errors_as_torch():
    # attn_mask with is_causal=True depends on the torch version (2.14 raises, 2.13 applies
    # both): tests/test_bad_input.py's causal_with_mask row checks it against the installed torch.
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    cases = [
        (dict(key=k.double()), "same dtype"),
        (dict(attn_mask=torch.zeros(5, 6, dtype=torch.int32)), "attn_mask dtype"),
        (dict(attn_mask=torch.zeros(5, 6, dtype=torch.float64)), "attn_mask dtype"),
        (dict(dropout_p=1.5), "between 0 and 1"),
        (dict(query=torch.randn(8)), "at least 2 dimensional"),
        (dict(key=torch.randn(1, 3, 6, 8), value=torch.randn(1, 3, 6, 8), enable_gqa=True), "must divide"),
        (dict(attn_mask=torch.ones(2, 4, 5, 6, dtype=torch.bool)), "broadcast"),
        (dict(key=torch.randn(1, 4, 6, 7)), "head dim"),
    ]
    for overrides, match in cases:
        args = dict(query=q, key=k, value=v) | overrides
        with pytest.raises(RuntimeError, match=match):
            sdpa(**args)
        with pytest.raises(RuntimeError):
            native_sdpa(**args)


def test_op_checks_name_the_argument():
    q, k, v = _qkv(1, 4, 2, 5, 6, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="query must be 4-D"):
        flash(q[0], k, v, None, False, 1.0)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        flash(q[:, :3], k, v, None, False, 1.0)
    with pytest.raises(TypeError, match="key dtype"):
        flash(q, k.double(), v, None, False, 1.0)
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        flash(q, k, v, torch.zeros(5, 6, dtype=torch.int64), False, 1.0)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        flash(q, k, v, torch.zeros(5, 7), False, 1.0)
    with pytest.raises(TypeError, match="query must be float32"):
        flash(q.int(), k.int(), v.int(), None, False, 1.0)
    out, lse = flash(q, k, v, None, False, 1.0)
    with pytest.raises(TypeError, match="logsumexp must be"):
        flash_backward(out, q, k, v, out, lse.double(), None, False, 1.0)
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        flash_backward(out[:, :, :2], q, k, v, out, lse, None, False, 1.0)


# ---- CUDA (skips without a GPU) -----------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_matches_torch_on_every_device(device, dtype):
    q = torch.randn(2, 4, 70, 32, device=device)
    k, v = torch.randn(2, 2, 90, 32, device=device), torch.randn(2, 2, 90, 32, device=device)
    mask = torch.rand(70, 90, device=device) > 0.3
    mask[:, 0] = True
    _check_sdpa_parity(q, k, v, dtype, attn_mask=mask, enable_gqa=True)


# ---- memory -------------------------------------------------------------------------------


def test_forward_and_backward_allocate_linear_not_quadratic_memory():
    """Everything allocated through torch in forward + backward at L = 4096 sums to less
    than 1/8 of one L x L float32 matrix (the math path allocates several)."""
    from torch.profiler import ProfilerActivity, profile

    L = 4096
    q, k, v = (torch.randn(1, 1, L, 16, requires_grad=True) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sdpa(q, k, v).sum().backward()
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events())
    assert 0 < allocated < L * L * 4 / 8, f"{allocated / 1e6:.1f} MB allocated"


# ---- dropout ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123's known-answer vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_reference_gives_random123_known_answers(counter, key, expected):
    words = philox4x32_10(*(torch.tensor(c, dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def _kernel_dropout_factors(B, H, L, dropout_p, dropout_seed, dtype=torch.float64, device="cpu"):
    """The kernel's (B, H, L, L) dropout factors, read through its output: with q = 0
    every key gets P = 1/L, and with V = identity, output[i, j] = P_ij * factor_ij."""
    q = torch.zeros(B, H, L, 8, dtype=dtype, device=device)
    v = torch.eye(L, dtype=dtype, device=device).expand(B, H, L, L)
    out, _ = flash(q, torch.randn(B, H, L, 8, dtype=dtype, device=device), v, None, False, 1.0, dropout_p, dropout_seed)
    return out * L


@pytest.mark.parametrize("device", devices())
def test_kernel_mask_is_the_reference_mask(device):
    seed = draw_dropout_seed()
    factors = _kernel_dropout_factors(2, 3, 70, 0.4, seed, device=device)
    reference = dropout_factors_reference(seed, 0.4, 6, 70, 70, torch.float64, device).view(2, 3, 70, 70)
    torch.testing.assert_close(factors, reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keeps_one_minus_p_and_scales_by_its_inverse(dropout_p):
    n = 4 * 256 * 256
    factors = _kernel_dropout_factors(2, 2, 256, dropout_p, draw_dropout_seed())
    kept = factors != 0
    torch.testing.assert_close(factors[kept], torch.full_like(factors[kept], 1 / (1 - dropout_p)), rtol=1e-12, atol=0)
    # Binomial(n, 1 - p): 5 standard deviations.
    bound = 5 * math.sqrt(n * dropout_p * (1 - dropout_p))
    assert abs(kept.sum().item() - n * (1 - dropout_p)) < bound


def test_dropout_one_drops_everything_and_zero_nothing():
    seed = draw_dropout_seed()
    assert torch.count_nonzero(_kernel_dropout_factors(1, 2, 40, 1.0, seed)) == 0
    no_dropout = _kernel_dropout_factors(1, 2, 40, 0.0, None)
    torch.testing.assert_close(no_dropout, torch.ones_like(no_dropout), rtol=1e-12, atol=0)


def test_dropout_is_reproducible_under_manual_seed_and_differs_between_calls():
    q, k, v = _qkv(2, 2, 2, 50, 60, 16, 16, torch.float32)
    torch.manual_seed(3)
    first, second = sdpa(q, k, v, dropout_p=0.3), sdpa(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    again = sdpa(q, k, v, dropout_p=0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert not torch.allclose(first, sdpa(q, k, v))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", OP_CASES[:4] + OP_CASES[6:], ids=OP_IDS[:4] + OP_IDS[6:])
def test_op_with_dropout_matches_float64_reference_with_the_same_mask(case, dtype, device):
    B, H, Hkv, Lq, Lk, E, Ev, causal, kind, mshape = case
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, E, Ev, dtype, device)
    mask = _mask(kind, mshape, dtype, device)
    scale, seed = 1 / math.sqrt(E), draw_dropout_seed()
    out, lse = flash(q, k, v, mask, causal, scale, 0.3, seed)
    grad_out = torch.randn_like(out)
    grads = flash_backward(grad_out, q, k, v, out, lse, mask, causal, scale, 0.3, seed)
    o_ref, lse_ref, *grads_ref = _op_oracle(q, k, v, mask, causal, scale, grad_out, 0.3, seed)
    assert_close_scaled(out, o_ref, dtype, "output")
    assert_close_scaled(lse, lse_ref, dtype, "logsumexp")
    for name, g, g_ref in zip(("query", "key", "value"), grads, grads_ref):
        assert_close_scaled(g, g_ref, dtype, f"grad_{name}")
    # The differentiable backward (create_graph) regenerates the same mask.
    reference = flash_attention_backward_reference(grad_out, q, k, v, mask, causal, scale, 0.3, seed)
    for g, g_ref in zip(grads, reference):
        assert_close_scaled(g, g_ref, dtype)


@pytest.mark.parametrize("B, H, Hkv, causal", [(2, 4, 2, False), (1, 3, 1, True)])
def test_dropout_backward_gives_the_same_bits_for_any_thread_count(B, H, Hkv, causal):
    q, k, v = _qkv(B, H, Hkv, 150, 170, 40, 24, torch.float32)
    seed = draw_dropout_seed()
    out, lse = flash(q, k, v, None, causal, 0.2, 0.25, seed)
    grad_out = torch.randn_like(out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = flash_backward(grad_out, q, k, v, out, lse, None, causal, 0.2, 0.25, seed)
        torch.set_num_threads(max(2, threads))
        many = flash_backward(grad_out, q, k, v, out, lse, None, causal, 0.2, 0.25, seed)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_sdpa_with_dropout_matches_the_reference_under_the_same_seed():
    """Leading dimensions, GQA and a mask: the wrapper numbers the slices as the reference does."""
    q, k, v = torch.randn(2, 3, 4, 33, 16), torch.randn(2, 3, 2, 41, 16), torch.randn(2, 3, 2, 41, 8)
    mask = torch.rand(4, 33, 41) > 0.2
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(11)
    ours = sdpa(qs, ks, vs, mask, dropout_p=0.35, enable_gqa=True)
    torch.manual_seed(11)
    ref = scaled_dot_product_attention_reference(qr, kr, vr, mask, dropout_p=0.35, enable_gqa=True)
    assert_close_scaled(ours, ref, torch.float32)
    grad_out = torch.randn_like(ours)
    for g, g_ref in zip(torch.autograd.grad(ours, (qs, ks, vs), grad_out), torch.autograd.grad(ref, (qr, kr, vr), grad_out)):
        assert_close_scaled(g, g_ref, torch.float32)
    with fastlayers.use_backend("reference"):
        torch.manual_seed(11)
        assert_close_scaled(sdpa(q, k, v, mask, dropout_p=0.35, enable_gqa=True), ours.detach(), torch.float32)


def test_dropout_is_unbiased_like_torchs():
    """torch's SDPA drops with another stream, so the comparison is statistical: the mean
    over calls of both approaches the output without dropout."""
    q, k, v = _qkv(1, 2, 2, 8, 12, 4, 4, torch.float64)
    exact = sdpa(q, k, v)
    calls = 400
    torch.manual_seed(0)
    ours = torch.stack([sdpa(q, k, v, dropout_p=0.5) for _ in range(calls)])
    native = torch.stack([native_sdpa(q, k, v, dropout_p=0.5) for _ in range(calls)])
    for samples in (ours, native):
        sem = samples.std(0) / math.sqrt(calls)
        assert ((samples.mean(0) - exact).abs() <= 5 * sem + 1e-12).all()


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64_with_dropout(causal):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 6, 9, 4, 3, torch.float64))
    seed = draw_dropout_seed()

    def fn(q, k, v):
        return flash(q, k, v, None, causal, 0.5, 0.3, seed)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_opcheck_with_dropout():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 9, 13, 8, 6, torch.float32))
    seed = draw_dropout_seed()
    torch.library.opcheck(flash, (q, k, v, None, False, 0.4, 0.2, seed))
    out, lse = flash(q.detach(), k.detach(), v.detach(), None, False, 0.4, 0.2, seed)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, False, 0.4, 0.2, seed)
    torch.library.opcheck(flash_backward, args)


def test_op_checks_the_dropout_arguments():
    q, k, v = _qkv(1, 1, 1, 3, 4, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="needs dropout_seed"):
        flash(q, k, v, None, False, 0.3, 0.2)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        flash(q, k, v, None, False, 0.3, 1.5, draw_dropout_seed())
    with pytest.raises(TypeError, match="dropout_seed must be int64"):
        flash(q, k, v, None, False, 0.3, 0.2, torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"dropout_seed must have shape \[2\]"):
        flash(q, k, v, None, False, 0.3, 0.2, torch.zeros(3, dtype=torch.int64))
