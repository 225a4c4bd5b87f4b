"""fastlayers.nn.MultiheadAttention against torch.nn.MultiheadAttention (same weights),
and fastlayers.nn.LuongAttention against a plain-torch computation of its equations."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import fastlayers
from helpers import devices, requires_extension

pytestmark = requires_extension

E, HEADS, L, S, N = 8, 2, 5, 6, 3


def _pair(dtype=torch.float64, device="cpu", **kwargs):
    """(torch module, fastlayers copy holding the same parameters)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, HEADS, device=device, dtype=dtype, **kwargs)
    ours = fastlayers.nn.MultiheadAttention(E, HEADS, device=device, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    # Random biases: torch initialises them to 0, which would hide a bias mix-up.
    with torch.no_grad():
        for a, b in zip(ref.parameters(), ours.parameters()):
            a.copy_(torch.randn_like(a))
            b.copy_(a)
    return ref, ours


def _inputs(batch_first, kdim, vdim, unbatched, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(1)

    def make(length, dim):
        shape = (length, dim) if unbatched else ((N, length, dim) if batch_first else (length, N, dim))
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    return make(L, E), make(S, kdim or E), make(S, vdim or E)


def _masks(kind, dtype, unbatched, src_len=S):
    """(key_padding_mask, attn_mask) of `kind`; no query row is left without a key."""
    g = torch.Generator().manual_seed(2)
    kpm = attn = None
    if kind in ("kpm_bool", "both_bool"):
        kpm = torch.zeros(N, src_len, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, 0] = True
    if kind in ("attn_bool", "both_bool"):
        attn = torch.rand(L, src_len, generator=g) < 0.3
        attn[:, 0] = False
        if kind == "both_bool":
            attn[:, 1] = False
    if kind == "kpm_float":
        kpm = torch.randn(N, src_len, generator=g, dtype=torch.float64).to(dtype)
    if kind == "attn_float":
        attn = torch.randn(L, src_len, generator=g, dtype=torch.float64).to(dtype)
    if kind == "attn_3d":
        attn = torch.randn((1 if unbatched else N) * HEADS, L, src_len, generator=g, dtype=torch.float64).to(dtype)
    if unbatched and kpm is not None:
        kpm = kpm[0]
    return kpm, attn


def _run(module, q, k, v, kpm, attn, **kw):
    return module(q, k, v, key_padding_mask=kpm, attn_mask=attn, **kw)


GRID = list(
    itertools.product(
        [False, True],  # batch_first
        [(None, None), (5, 7)],  # kdim, vdim
        [True, False],  # bias
        [False, True],  # add_bias_kv
        [False, True],  # add_zero_attn
    )
)


@pytest.mark.parametrize("batch_first,kvdim,bias,add_bias_kv,add_zero_attn", GRID)
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "attn_bool", "both_bool", "kpm_float", "attn_float", "attn_3d"])
def test_forward_matches_torch_float64(batch_first, kvdim, bias, add_bias_kv, add_zero_attn, masks):
    kdim, vdim = kvdim
    cfg = dict(batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias, add_bias_kv=add_bias_kv)
    ref, ours = _pair(add_zero_attn=add_zero_attn, **cfg)
    q, k, v = _inputs(batch_first, kdim, vdim, unbatched=False)
    kpm, attn = _masks(masks, torch.float64, unbatched=False)
    for need_weights, average in ((False, True), (True, True), (True, False)):
        kw = dict(need_weights=need_weights, average_attn_weights=average)
        out_ref, w_ref = _run(ref, q, k, v, kpm, attn, **kw)
        out, w = _run(ours, q, k, v, kpm, attn, **kw)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        if need_weights:
            torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
        else:
            assert w is None and w_ref is None


@pytest.mark.parametrize("masks", ["none", "kpm_bool", "attn_float", "attn_3d"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched_matches_torch(masks, need_weights):
    ref, ours = _pair(add_bias_kv=True)
    q, k, v = _inputs(False, None, None, unbatched=True)
    kpm, attn = _masks(masks, torch.float64, unbatched=True)
    out_ref, w_ref = _run(ref, q, k, v, kpm, attn, need_weights=need_weights)
    out, w = _run(ours, q, k, v, kpm, attn, need_weights=need_weights)
    assert out.shape == (L, E)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    if need_weights:
        assert w.shape == (L, S + 1)
        torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_with_causal_mask(with_kpm, need_weights):
    ref, ours = _pair(batch_first=True)
    x = torch.randn(N, L, E, dtype=torch.float64)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True: not allowed
    kpm = None
    if with_kpm:
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, -1] = True
    kw = dict(key_padding_mask=kpm, attn_mask=causal, is_causal=True, need_weights=need_weights)
    out_ref, w_ref = ref(x, x, x, **kw)
    out, w = ours(x, x, x, **kw)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    # The hint is honoured: the first position sees only itself.
    alone = ours(x[:, :1], x[:, :1], x[:, :1], need_weights=False)[0]
    torch.testing.assert_close(out[:, :1], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_padded_row_matches_torch_regular_path(need_weights):
    # torch's regular path: 0 attention for the row without weights (SDPA's safe
    # softmax), NaN with need_weights=True (plain softmax); the module does the same.
    ref, ours = _pair(batch_first=True)
    x = torch.randn(N, L, E, dtype=torch.float64)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True
    out_ref, w_ref = ref(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12, equal_nan=True)
    assert out[1].isnan().all() == need_weights
    if need_weights:
        torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(device, dtype):
    ref, ours = _pair(dtype=torch.float64, device=device, batch_first=True)
    q, k, v = _inputs(True, None, None, unbatched=False, device=device)
    kpm, _ = _masks("kpm_bool", torch.float64, unbatched=False)
    kpm = kpm.to(device)
    oracle = ref(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
    native = ref.to(dtype)(q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=kpm, need_weights=False)[0]
    out = ours.to(dtype)(q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=kpm, need_weights=False)[0]
    assert out.dtype == dtype
    ours_err = (out.double() - oracle).abs().max().item()
    torch_err = (native.double() - oracle).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-5, (ours_err, torch_err)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kvdim", [(None, None), (5, 7)])
def test_gradients_match_torch(need_weights, kvdim):
    kdim, vdim = kvdim
    ref, ours = _pair(kdim=kdim, vdim=vdim, add_bias_kv=True, batch_first=True)
    q, k, v = _inputs(True, kdim, vdim, unbatched=False)
    kpm, attn = _masks("both_bool", torch.float64, unbatched=False, src_len=S)
    grads = []
    for module in (ref, ours):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, w = module(*inputs, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        if need_weights:
            loss = loss + (w * w).sum()
        grads.append(torch.autograd.grad(loss, inputs + list(module.parameters())))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-11)


def test_gradcheck_float64():
    torch.manual_seed(0)
    module = fastlayers.nn.MultiheadAttention(4, 2, add_bias_kv=True, dtype=torch.float64)
    q = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False, False, True, False], [False, False, False, False]])
    assert torch.autograd.gradcheck(
        lambda q, kv: module(q, kv, kv, key_padding_mask=kpm, need_weights=False)[0], (q, kv)
    )


def test_train_mode_dropout_shape_and_reproducibility():
    _, ours = _pair(dropout=0.5, batch_first=True)
    ours.train()
    q, k, v = _inputs(True, None, None, unbatched=False)
    for need_weights in (False, True):
        torch.manual_seed(5)
        a, wa = ours(q, k, v, need_weights=need_weights)
        torch.manual_seed(5)
        b, wb = ours(q, k, v, need_weights=need_weights)
        torch.manual_seed(6)
        c, _ = ours(q, k, v, need_weights=need_weights)
        assert a.shape == (N, L, E)
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
        if need_weights:
            assert wa.shape == (N, L, S)
            torch.testing.assert_close(wa, wb)
    ours.eval()
    torch.testing.assert_close(ours(q, k, v)[0], ours(q, k, v)[0])


@pytest.mark.parametrize("kvdim", [(None, None), (5, 7)])
@pytest.mark.parametrize("bias,add_bias_kv", [(True, True), (False, False)])
def test_state_dict_both_ways_and_same_initialisation(kvdim, bias, add_bias_kv):
    kdim, vdim = kvdim
    kw = dict(kdim=kdim, vdim=vdim, bias=bias, add_bias_kv=add_bias_kv)
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(E, HEADS, **kw)
    torch.manual_seed(3)
    ours = fastlayers.nn.MultiheadAttention(E, HEADS, **kw)
    assert isinstance(ours, nn.MultiheadAttention)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for name in sd_ref:  # same draws from the generator: the initialisation is torch's
        torch.testing.assert_close(sd_ours[name], sd_ref[name], rtol=0, atol=0)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    ref.load_state_dict(ours.state_dict())
    fresh = fastlayers.nn.MultiheadAttention(E, HEADS, **kw)
    fresh.load_state_dict(ref.state_dict())
    for name, t in fresh.state_dict().items():
        torch.testing.assert_close(t, sd_ours[name], rtol=0, atol=0)
    assert repr(ours).replace("fastlayers", "") == repr(ref).replace("torch.nn", "")


def test_from_torch_copies_everything():
    ref = nn.MultiheadAttention(
        E, HEADS, dropout=0.25, bias=False, add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=7,
        batch_first=True, dtype=torch.float64,
    )
    ref.eval()
    ours = fastlayers.nn.MultiheadAttention.from_torch(ref)
    assert type(ours) is fastlayers.nn.MultiheadAttention
    for attr in ("embed_dim", "num_heads", "dropout", "batch_first", "kdim", "vdim", "add_zero_attn", "training"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.out_proj.weight.dtype == torch.float64
    q, k, v = _inputs(True, 5, 7, unbatched=False)
    with torch.no_grad():
        ref.bias_k.normal_()
    ours = fastlayers.nn.MultiheadAttention.from_torch(ref)
    torch.testing.assert_close(ours(q, k, v)[0], ref(q, k, v)[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="expects a torch.nn.MultiheadAttention"):
        fastlayers.nn.MultiheadAttention.from_torch(nn.Linear(2, 2))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = fastlayers.nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, 1)

    def forward(self, x, kpm):
        out, _ = self.attn(x, x, x, key_padding_mask=kpm, need_weights=False)
        return self.head(out).sum()


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Encoder()
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, -1] = True
    eager = model(x, kpm)
    grads_eager = torch.autograd.grad(eager, list(model.parameters()))
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    result = torch.compile(model, backend=backend, fullgraph=True)(x, kpm)
    grads = torch.autograd.grad(result, list(model.parameters()))
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(grads, grads_eager)
    assert "fastlayers.flash_attention.default" in seen


def _errors(module, *args, **kwargs):
    try:
        module(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type and message are what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize(
    "case",
    [
        "is_causal_without_mask",
        "wrong_embed_dim",
        "kv_shape_mismatch",
        "bad_2d_mask",
        "bad_3d_mask",
        "bad_kpm",
        "4d_query",
        "int_mask",
    ],
)
def test_errors_match_torch(case):
    ref, ours = _pair()
    q, k, v = _inputs(False, None, None, unbatched=False)
    kw = {}
    if case == "is_causal_without_mask":
        kw = dict(is_causal=True)
    elif case == "wrong_embed_dim":
        q, k, v = q[..., :4], k[..., :4], v[..., :4]
    elif case == "kv_shape_mismatch":
        v = v[:-1]
    elif case == "bad_2d_mask":
        kw = dict(attn_mask=torch.zeros(L, S + 1, dtype=torch.float64))
    elif case == "bad_3d_mask":
        kw = dict(attn_mask=torch.zeros(N, L, S, dtype=torch.float64))
    elif case == "bad_kpm":
        kw = dict(key_padding_mask=torch.zeros(N, S + 2, dtype=torch.bool))
    elif case == "4d_query":
        q = q.unsqueeze(0)
    elif case == "int_mask":
        kw = dict(attn_mask=torch.zeros(L, S, dtype=torch.int64))
    expected = _errors(ref, q, k, v, **kw)
    assert expected is not None
    assert _errors(ours, q, k, v, **kw) == expected


# ---- LuongAttention ------------------------------------------------------------------------


def _luong_oracle(module, enc, query, mask):
    """The docstring's equations, in plain torch ops."""
    B, T, H = enc.shape
    q = module.pool_query.expand(B, H) if query is None else query
    if module.score == "dot":
        s = torch.einsum("bh,bth->bt", q, enc)
    elif module.score == "general":
        s = torch.einsum("bh,hk,btk->bt", q, module.linear.weight, enc)
    else:
        cat = torch.cat([q.unsqueeze(1).expand(B, T, H), enc], dim=-1)
        s = torch.tanh(cat @ module.linear.weight.T) @ module.v
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bt,bth->bh", a, enc), a


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
@pytest.mark.parametrize("with_query", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_luong_matches_equations(score, with_query, with_mask):
    torch.manual_seed(0)
    module = fastlayers.nn.LuongAttention(6, score=score, dtype=torch.float64)
    enc = torch.randn(4, 7, 6, dtype=torch.float64)
    query = torch.randn(4, 6, dtype=torch.float64) if with_query else None
    mask = None
    if with_mask:
        mask = torch.zeros(4, 7, dtype=torch.bool)
        mask[0, 3:] = True
        mask[2, :] = True  # all padding: context and weights 0
    context, weights = module(enc, query, mask)
    ref_context, ref_weights = _luong_oracle(module, enc, query, mask)
    assert context.shape == (4, 6) and weights.shape == (4, 7)
    torch.testing.assert_close(context, ref_context, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)
    if with_mask:
        assert (weights[mask] == 0).all() and (context[2] == 0).all()


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_gradcheck_float64(score):
    torch.manual_seed(0)
    module = fastlayers.nn.LuongAttention(3, score=score, dtype=torch.float64)
    enc = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    query = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, True, False], [False, False, False, False]])
    assert torch.autograd.gradcheck(lambda e, q: module(e, q, mask), (enc, query))
    params = list(module.parameters())
    assert torch.autograd.gradcheck(lambda *ps: module(enc, None, mask), params)


@pytest.mark.parametrize("score", ["dot", "concat"])
def test_luong_torch_compile_fullgraph(score):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = fastlayers.nn.LuongAttention(6, score=score)
    enc = torch.randn(4, 7, 6)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[1, 5:] = True
    eager = module(enc, None, mask)
    compiled = torch.compile(module, fullgraph=True)(enc, None, mask)
    torch.testing.assert_close(compiled, eager)


def test_luong_parameters_and_errors():
    assert [n for n, _ in fastlayers.nn.LuongAttention(4).named_parameters()] == ["pool_query"]
    general = dict(fastlayers.nn.LuongAttention(4, "general").named_parameters())
    assert general["linear.weight"].shape == (4, 4)
    concat = dict(fastlayers.nn.LuongAttention(4, "concat").named_parameters())
    assert concat["linear.weight"].shape == (4, 8) and concat["v"].shape == (4,)
    assert repr(fastlayers.nn.LuongAttention(4)) == "LuongAttention(4, score='dot')"
    module = fastlayers.nn.LuongAttention(4)
    with pytest.raises(ValueError, match="score must be one of"):
        fastlayers.nn.LuongAttention(4, "additive")
    with pytest.raises(ValueError, match="encoder_outputs must be"):
        module(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="query must be"):
        module(torch.randn(2, 3, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        module(torch.randn(2, 3, 4), None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask must be"):
        module(torch.randn(2, 3, 4), None, torch.zeros(2, 4, dtype=torch.bool))
