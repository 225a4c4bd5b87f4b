"""Flash attention: ``softmax(Q K^T * scale + mask) V`` in tiles, memory linear in length.

* ``torch.ops.fastlayers.flash_attention(query, key, value, attn_mask, is_causal, scale)``
  returns ``(output, logsumexp)`` for 4-D ``(B, H, L, E)`` tensors (key/value with
  ``Hkv`` heads, ``H`` a multiple of ``Hkv``); ``flash_attention_backward`` recomputes
  the probabilities from the logsumexp. Kernels in csrc/attention/, schemas in
  csrc/registration.cpp.
* here: fake kernels, autograd, the pure-PyTorch references (fallback and test
  oracle) and :func:`scaled_dot_product_attention`, a drop-in for
  ``torch.nn.functional.scaled_dot_product_attention``.

Rows that see no key (every key masked out, or an empty key sequence) give an output
of 0 and gradients of 0, as torch's SDPA does on the CPU (its ``_safe_softmax``); their
logsumexp is ``-inf``.

Dropout: the mask is a pure function of a ``[seed, offset]`` pair drawn from torch's
CPU generator once per call (:func:`draw_dropout_seed`, so ``torch.manual_seed``
reproduces it) and of (slice, query row, key column), through Philox 4x32-10
(csrc/attention/dropout.h; :func:`dropout_factors_reference` is the same function in
torch ops). The backward regenerates it instead of storing it. It is not torch's own
dropout stream: under the same seed, torch's SDPA drops other probabilities, so parity
with torch under dropout is statistical, while parity with the references here is exact.
"""

from __future__ import annotations

import math

import torch

from fastlayers import _extension, backend
from fastlayers.ops.autograd import register_autograd

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Head and value dims the CUDA kernels take (attention_kernel.h: kCudaMaxHeadDim); the CPU kernels take any.
CUDA_MAX_HEAD_DIM = 256
# torch's C++ names, for messages worded like torch's own.
_TORCH_NAMES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "c10::Half",
    torch.bfloat16: "c10::BFloat16",
}


def _name(dtype: torch.dtype) -> str:
    return _TORCH_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ---- dropout mask --------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def draw_dropout_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``[seed, offset]`` pair (int64, CPU) keying one call's dropout mask, drawn
    from ``generator`` (torch's default CPU generator when None), which it advances."""
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator)


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of a * b (a a 32-bit constant, b int64 in [0, 2^32)),
    in 16-bit halves so that no int64 product overflows."""
    low_half, high_half = b * (a & 0xFFFF), b * (a >> 16)  # each < 2^48
    hi = (high_half + (low_half >> 16)) >> 16
    lo = (low_half + ((high_half & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox 4x32-10 (Random123's philox4x32_R(10)) on int64 tensors holding 32-bit
    words; counters broadcast against each other. dropout.h's philox4x32_10 in torch ops."""
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_WEYL[0]) & _MASK32, (k1 + _PHILOX_WEYL[1]) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """Words (uniform on [0, 2^32)) at or above this are kept: probability 1 - p."""
    return math.floor(dropout_p * 2**32 + 0.5)  # C++'s llround for p >= 0


def dropout_factors_reference(dropout_seed, dropout_p: float, slices: int, q_len: int, kv_len: int, dtype, device):
    """(slices, Lq, Lk) factors, 1/(1-p) where kept and 0 where dropped: the kernels'
    mask (dropout.h) in torch ops. Element (bh, i, j) is word j % 4 of
    philox4x32_10(counter=(j // 4, i, bh, offset), key=seed)."""
    seed = dropout_seed.to(device=device, dtype=torch.int64)
    k0, k1 = seed[0] & _MASK32, (seed[0] >> 32) & _MASK32
    offset = seed[1] & _MASK32
    quads = (kv_len + 3) // 4
    c0 = torch.arange(quads, device=device, dtype=torch.int64).view(1, 1, quads)
    c1 = torch.arange(q_len, device=device, dtype=torch.int64).view(1, q_len, 1)
    c2 = torch.arange(slices, device=device, dtype=torch.int64).view(slices, 1, 1)
    words = torch.stack(philox4x32_10(c0, c1, c2, offset, k0, k1), dim=-1)
    words = words.expand(slices, q_len, quads, 4).reshape(slices, q_len, 4 * quads)[..., :kv_len]
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    kept = torch.full((), keep_scale, dtype=dtype, device=device)
    return torch.where(words >= dropout_threshold(dropout_p), kept, torch.zeros((), dtype=dtype, device=device))


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The logsumexp dtype the kernels use: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- checks -------------------------------------------------------------------------


def check_flash_args(query, key, value, attn_mask, op: str = "flash_attention") -> None:
    """The checks of the C++ op entry (4-D layout), with its messages and exception types."""
    if query.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: query must be float32, float64, float16 or bfloat16, got {query.dtype}")
    for name, t, what in (
        ("query", query, "heads, query length, head dim"),
        ("key", key, "kv heads, key length, head dim"),
        ("value", value, "kv heads, key length, value dim"),
    ):
        if t.dim() != 4:
            raise RuntimeError(f"{op}: {name} must be 4-D (batch, {what}), got shape {list(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.device != query.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but query is on {query.device}")
        if t.dtype != query.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} does not match query dtype {query.dtype}")
    B, H, Lq, E = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if key.shape[0] != B or value.shape[0] != B:
        raise RuntimeError(f"{op}: query, key and value must have the same batch size")
    if key.shape[3] != E:
        raise RuntimeError(f"{op}: key head dim {key.shape[3]} does not match query head dim {E}")
    if value.shape[1] != Hkv or value.shape[2] != Lk:
        raise RuntimeError(f"{op}: value must have key's heads and length ({Hkv}, {Lk}), got shape {list(value.shape)}")
    if (Hkv > 0 and H % Hkv != 0) or (Hkv == 0 and H != 0):
        raise RuntimeError(f"{op}: query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if attn_mask is not None:
        if attn_mask.device != query.device:
            raise RuntimeError(f"{op}: attn_mask is on {attn_mask.device} but query is on {query.device}")
        if attn_mask.dtype not in (torch.bool, query.dtype):
            raise TypeError(f"{op}: attn_mask must be bool or have query's dtype {query.dtype}, got {attn_mask.dtype}")
        full = (B, H, Lq, Lk)
        ok = attn_mask.dim() <= 4 and all(
            s == 1 or s == f for s, f in zip(reversed(attn_mask.shape), reversed(full))
        )
        if not ok:
            raise RuntimeError(
                f"{op}: attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                f"(batch, heads, query length, key length) = {list(full)}"
            )


def _check_dropout_args(dropout_p, dropout_seed, op: str) -> None:
    """The C++ entry's checks of dropout_p and dropout_seed (attention.cpp: dropout_params)."""
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p == 0.0:
        return
    if dropout_seed is None:
        raise RuntimeError(f"{op}: dropout_p = {dropout_p} needs dropout_seed, an int64 tensor [seed, offset]")
    if dropout_seed.device.type != "cpu":
        raise RuntimeError(f"{op}: dropout_seed must be on the CPU, got {dropout_seed.device}")
    if dropout_seed.dtype != torch.int64:
        raise TypeError(f"{op}: dropout_seed must be int64, got {dropout_seed.dtype}")
    if dropout_seed.shape != (2,):
        raise RuntimeError(f"{op}: dropout_seed must have shape [2] (seed, offset), got shape {list(dropout_seed.shape)}")


def check_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> None:
    """torch.nn.functional.scaled_dot_product_attention's checks, same exception types."""
    if query.dtype != key.dtype or query.dtype != value.dtype:
        raise RuntimeError(
            "Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{_name(query.dtype)} key.dtype: {_name(key.dtype)} and value.dtype: {_name(value.dtype)} instead."
        )
    if query.device != key.device or query.device != value.device:
        raise RuntimeError(
            "Expected query, key, and value to have the same device type, but got query.device: "
            f"{query.device} key.device: {key.device} and value.device: {value.device} instead."
        )
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(
            "Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
            f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
        raise RuntimeError(
            "Expected attn_mask dtype to be bool or float or to match query dtype, but got attn_mask.dtype: "
            f"{_name(attn_mask.dtype)} and  query.dtype: {_name(query.dtype)} instead."
        )
    if attn_mask is not None and is_causal and _TORCH_REJECTS_MASK_WITH_CAUSAL:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(
            f"scaled_dot_product_attention: key head dim {key.shape[-1]} does not match query's {query.shape[-1]}"
        )
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(
            f"scaled_dot_product_attention: value length {value.shape[-2]} does not match key's {key.shape[-2]}"
        )
    if _gqa_heads(query, key, value, enable_gqa) is not None:
        Hq, Hkv = query.shape[-3], key.shape[-3]
        if value.shape[-3] != Hkv or Hq % Hkv != 0:
            raise RuntimeError(
                "Number of heads in key and value must divide the number of heads in query: "
                f"query heads {Hq}, key heads {Hkv}, value heads {value.shape[-3]}"
            )


def _torch_rejects_mask_with_causal() -> bool:
    """Whether the installed torch's CPU SDPA refuses attn_mask together with is_causal.

    torch 2.14 raises; torch 2.13's CPU kernel accepts it and applies both (the kernels
    and references here apply both too), so fastlayers follows the installed torch.
    Probed once at import, so torch.compile traces a constant.
    """
    x = torch.zeros(1, 1, 2, 2)
    try:
        torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(2, 2, dtype=torch.bool), is_causal=True)
    except RuntimeError:
        return True
    return False


_TORCH_REJECTS_MASK_WITH_CAUSAL = _torch_rejects_mask_with_causal()


def _gqa_heads(query, key, value, enable_gqa):
    """(Hq, Hkv) when enable_gqa asks for grouped heads (the head counts differ), else None."""
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and value.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        return query.shape[-3], key.shape[-3]
    return None


# ---- references ---------------------------------------------------------------------


def _logits(query, key, attn_mask, is_causal, scale):
    s = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        Lq, Lk = s.shape[-2:]
        visible = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s


def _safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension; 0 for rows that are -inf throughout (torch's _safe_softmax)."""
    hidden = (s == float("-inf")).all(dim=-1, keepdim=True)
    # Such rows are softmaxed as zeros (then zeroed) so that autograd through here
    # gives 0, not NaN, for them.
    return torch.softmax(s.masked_fill(hidden, 0.0), dim=-1).masked_fill(hidden, 0.0)


def _dropout_factors_4d(query, key, dropout_p, dropout_seed):
    """The (B, H, Lq, Lk) dropout factors of the 4-D op, or None without dropout."""
    if dropout_p == 0.0:
        return None
    B, H, Lq, _ = query.shape
    factors = dropout_factors_reference(dropout_seed, dropout_p, B * H, Lq, key.shape[2], query.dtype, query.device)
    return factors.view(B, H, Lq, key.shape[2])


def flash_attention_reference(
    query, key, value, attn_mask, is_causal: bool, scale: float, dropout_p: float = 0.0, dropout_seed=None
):
    """(output, logsumexp) of the 4-D op in plain, differentiable PyTorch ops."""
    check_flash_args(query, key, value, attn_mask)
    group = query.shape[1] // key.shape[1] if key.shape[1] else 1
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    s = _logits(query, k, attn_mask, is_causal, scale)
    p = _safe_softmax(s)
    factors = _dropout_factors_4d(query, key, dropout_p, dropout_seed)
    if factors is not None:
        p = p * factors
    return torch.matmul(p, v), torch.logsumexp(s, dim=-1).to(lse_dtype(query.dtype))


def flash_attention_backward_reference(
    grad_output, query, key, value, attn_mask, is_causal: bool, scale: float, dropout_p: float = 0.0, dropout_seed=None
):
    """(grad_query, grad_key, grad_value) by the flash backward's formulas, differentiable.

    With dropout factors f: P_drop = P f, dV = P_drop^T dO, dS = P (f dO V^T - D) with
    D = rowsum(dO * O), O = P_drop V."""
    B, H, Lq, _ = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    group = H // Hkv if Hkv else 1
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    p = _safe_softmax(_logits(query, k, attn_mask, is_causal, scale))
    dp = torch.matmul(grad_output, v.transpose(-2, -1))
    factors = _dropout_factors_4d(query, key, dropout_p, dropout_seed)
    p_kept = p if factors is None else p * factors
    if factors is not None:
        dp = dp * factors
    ds = p * (dp - (grad_output * torch.matmul(p_kept, v)).sum(-1, keepdim=True))
    grad_query = torch.matmul(ds, k) * scale
    grad_key = (torch.matmul(ds.transpose(-2, -1), query) * scale).view(B, Hkv, group, Lk, -1).sum(2)
    grad_value = torch.matmul(p_kept.transpose(-2, -1), grad_output).view(B, Hkv, group, Lk, -1).sum(2)
    return grad_query, grad_key, grad_value


def scaled_dot_product_attention_reference(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """torch's math definition in plain PyTorch ops (the oracle and the fallback).

    Dropout draws one ``[seed, offset]`` pair from torch's generator
    (:func:`draw_dropout_seed`) and drops with the kernels' counter-based mask, so the
    reference and the kernel drop the same probabilities under the same
    ``torch.manual_seed`` (torch's own SDPA drops others: its mask is another stream).
    """
    check_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if _gqa_heads(query, key, value, enable_gqa) is not None:
        group = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(group, -3), value.repeat_interleave(group, -3)
    s = _logits(query, key, None, is_causal, scale)
    if attn_mask is not None:
        _check_mask_shape(attn_mask, s.shape)
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    p = _safe_softmax(s)
    if dropout_p > 0.0:
        # The (..., Lq, Lk) weights as (slices, Lq, Lk): slice = flat index of the leading
        # dimensions, as the kernel's batch * heads + head.
        slices = math.prod(p.shape[:-2])
        factors = dropout_factors_reference(draw_dropout_seed(), dropout_p, slices, *p.shape[-2:], p.dtype, p.device)
        p = p * factors.view(p.shape)
    return torch.matmul(p, value)


def _check_mask_shape(attn_mask, logits_shape) -> None:
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, logits_shape) == torch.Size(logits_shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise RuntimeError(
            f"scaled_dot_product_attention: attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
            f"the attention weights' shape {list(logits_shape)}"
        )


# ---- torch.library registrations ----------------------------------------------------

if _extension.available():

    @torch.library.register_fake("fastlayers::flash_attention")
    def _flash_attention_fake(query, key, value, attn_mask, is_causal, scale, dropout_p=0.0, dropout_seed=None):
        check_flash_args(query, key, value, attn_mask)
        _check_dropout_args(dropout_p, dropout_seed, "flash_attention")
        B, H, Lq, _ = query.shape
        output = query.new_empty((B, H, Lq, value.shape[3]))
        return output, query.new_empty((B, H, Lq), dtype=lse_dtype(query.dtype))

    @torch.library.register_fake("fastlayers::flash_attention_backward")
    def _flash_attention_backward_fake(
        grad_output, query, key, value, output, logsumexp, attn_mask, is_causal, scale, dropout_p=0.0, dropout_seed=None
    ):
        check_flash_args(query, key, value, attn_mask, op="flash_attention_backward")
        _check_dropout_args(dropout_p, dropout_seed, "flash_attention_backward")
        return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)

    def _setup_context(ctx, inputs, output):
        query, key, value, attn_mask, is_causal, scale, dropout_p, dropout_seed = inputs
        out, lse = output
        ctx.is_causal, ctx.scale, ctx.dropout_p = is_causal, scale, dropout_p
        ctx.save_for_backward(query, key, value, attn_mask, out, lse, dropout_seed)
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_output, _grad_lse):
        query, key, value, attn_mask, out, lse, dropout_seed = ctx.saved_tensors
        if ctx.needs_input_grad[3]:
            raise RuntimeError(
                "flash_attention: the gradient with respect to attn_mask is not computed by the kernel; "
                "fastlayers.functional.scaled_dot_product_attention runs the reference for a mask that requires grad"
            )
        if torch.is_grad_enabled():
            # create_graph=True: a gradient built from differentiable reference ops.
            grads = flash_attention_backward_reference(
                grad_output, query, key, value, attn_mask, ctx.is_causal, ctx.scale, ctx.dropout_p, dropout_seed
            )
        else:
            grads = torch.ops.fastlayers.flash_attention_backward.default(
                grad_output, query, key, value, out, lse, attn_mask, ctx.is_causal, ctx.scale, ctx.dropout_p,
                dropout_seed,
            )
        return (*grads, None, None, None, None, None)

    register_autograd("fastlayers::flash_attention", _backward, setup_context=_setup_context)


# ---- public wrapper ---------------------------------------------------------------------


def _as_4d(query, key, value, attn_mask, enable_gqa):
    """query/key/value (and the mask) as the op's (N, H, L, E) tensors, and the output shape.

    Leading dimensions broadcast against each other as in torch's matmul; stride-0
    views carry the broadcast, so 4-D inputs are never copied.
    """
    Lq, Lk, E, Ev = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    gqa = _gqa_heads(query, key, value, enable_gqa)
    if gqa is not None:
        Hq, Hkv = gqa
        batch = tuple(torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3]))
        lead = batch + (Hq,)
    else:
        lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
        batch, Hq = (lead[:-1], lead[-1]) if lead else ((), 1)
        Hkv = Hq
    N = math.prod(batch)
    q = query.expand(*batch, Hq, Lq, E).reshape(N, Hq, Lq, E)
    k = key.expand(*batch, Hkv, Lk, E).reshape(N, Hkv, Lk, E)
    v = value.expand(*batch, Hkv, Lk, Ev).reshape(N, Hkv, Lk, Ev)
    mask = attn_mask
    if mask is not None:
        _check_mask_shape(mask, (*lead, Lq, Lk))  # the weights' shape, as torch checks it
        full = (*batch, Hq, Lq, Lk)
        if len(full) > 4:  # fold the batch dimensions (a copy only where a view cannot express it)
            mask = mask.expand(full).reshape(N, Hq, Lq, Lk)
    return q, k, v, mask, (*lead, Lq, Ev)


# Device types with a registered flash-attention kernel (CPU now; CUDA once it lands),
# looked up once: torch.compile cannot trace the dispatcher query.
_KERNEL_DEVICE_TYPES = frozenset(
    device_type
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if _extension.available() and torch._C._dispatch_has_kernel_for_dispatch_key("fastlayers::flash_attention", key)
)


def _kernel_runs_on(device: torch.device) -> bool:
    """Whether the flash kernels exist for `device` and the kernels backend is selected."""
    return device.type in _KERNEL_DEVICE_TYPES and backend.use_kernels(device)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, flash-style.

    Same arguments, shapes (``(..., L, E)`` with any leading dimensions that broadcast),
    masks (bool: True takes part; float: added to the logits; broadcastable), causal
    alignment (top-left, as torch, when ``Lq != Lk``), ``scale`` (default
    ``1/sqrt(E)``) and ``enable_gqa``. The kernel keeps only O(L) extra memory: tiles,
    and a logsumexp per query row for the backward.

    ``dropout_p > 0`` drops probabilities (scaling the kept ones by ``1/(1-p)``) with a
    counter-based mask keyed by a ``[seed, offset]`` pair drawn from torch's CPU
    generator (reproducible under ``torch.manual_seed``; regenerated in the backward,
    never stored). It is not torch's dropout stream: the same seed drops other
    probabilities than torch's SDPA does (same keep rate and scaling).

    Runs the pure-PyTorch reference instead of the kernel (same results, same dropout
    mask, O(Lq*Lk) memory) for a float ``attn_mask`` that requires grad (the kernel computes no mask gradient), for dtypes
    other than float32/float64/float16/bfloat16, and on devices without fastlayers
    attention kernels; on CUDA also for head or value dims above 256.
    """
    check_sdpa_args(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    needs_reference = (
        (attn_mask is not None and attn_mask.requires_grad)
        or (query.device.type == "cuda" and max(query.shape[-1], value.shape[-1]) > CUDA_MAX_HEAD_DIM)
    )
    if needs_reference or not _kernel_runs_on(query.device) or query.dtype not in _SUPPORTED_DTYPES:
        return scaled_dot_product_attention_reference(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    q, k, v, mask, out_shape = _as_4d(query, key, value, attn_mask, enable_gqa)
    dropout_seed = draw_dropout_seed() if dropout_p > 0.0 else None
    out, _ = torch.ops.fastlayers.flash_attention.default(
        q, k, v, mask, is_causal, float(scale), float(dropout_p), dropout_seed
    )
    return out.view(out_shape)
