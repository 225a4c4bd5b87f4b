"""Attention modules: drop-in ``MultiheadAttention`` and ``LuongAttention`` pooling.

``MultiheadAttention`` subclasses ``torch.nn.MultiheadAttention`` and replaces only
``forward``, so the constructor, parameter names and shapes, initialisation,
``state_dict`` and ``extra_repr`` are torch's own; ``isinstance(m,
torch.nn.MultiheadAttention)`` holds after a swap.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fastlayers.ops.attention import _safe_softmax, scaled_dot_product_attention


def _multi_head_attention_forward(
    query, key, value, module, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
):
    """torch.nn.functional.multi_head_attention_forward's steps (sequence-first inputs),
    with the attention run by fastlayers' scaled_dot_product_attention when the weights
    are not needed. Same checks, same exception types and messages as torch."""
    num_heads = module.num_heads
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)

    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. "
            "You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        # The hint stands in for the mask (torch does the same: SDPA's is_causal).
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal

    if embed_dim != module.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {module.embed_dim}, but got {embed_dim}")
    head_dim = module.head_dim
    if module._qkv_same_embed_dim:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        q, k, v = F._in_projection_packed(query, key, value, module.in_proj_weight, module.in_proj_bias)
    else:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
        b_q = b_k = b_v = None
        if module.in_proj_bias is not None:
            b_q, b_k, b_v = module.in_proj_bias.chunk(3)
        q, k, v = F._in_projection(
            query, key, value, module.q_proj_weight, module.k_proj_weight, module.v_proj_weight, b_q, b_k, b_v
        )

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, "
                    f"but should be {(bsz * num_heads, tgt_len, src_len)}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, module.bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

    if module.add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    src_len = k.size(1)
    if key_padding_mask is not None:
        # torch's _check_key_padding_mask, written as plain raises so torch.compile traces it.
        for dim, expected in ((0, bsz), (1, src_len)):
            if key_padding_mask.shape[dim] != expected:
                raise AssertionError(
                    f"Expected key_padded_mask.shape[{dim}] to be {expected}, but got {key_padding_mask.shape[dim]}"
                )
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

    dropout_p = module.dropout if module.training else 0.0

    if need_weights:
        # The weights are an output: materialise them (torch's own formulas).
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = torch.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = F.linear(out, module.out_proj.weight, module.out_proj.bias).unflatten(0, (tgt_len, bsz))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights

    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, attn_mask.size(1), src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = F.linear(out, module.out_proj.weight, module.out_proj.bias).unflatten(0, (tgt_len, bsz))
    if not is_batched:
        out = out.squeeze(1)
    return out, None


def mha_constructor_args(module: nn.MultiheadAttention) -> dict:
    """The constructor arguments (all but device and dtype) that rebuild ``module``'s
    hyperparameters, for torch.nn.MultiheadAttention or its fastlayers twin."""
    return dict(
        embed_dim=module.embed_dim,
        num_heads=module.num_heads,
        dropout=module.dropout,
        bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None,
        add_zero_attn=module.add_zero_attn,
        kdim=module.kdim,
        vdim=module.vdim,
        batch_first=module.batch_first,
    )


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with the attention computed by
    ``fastlayers.functional.scaled_dot_product_attention``.

    Same constructor, parameters, ``state_dict``, forward arguments, masks (bool: True
    = not allowed; float: added), ``key_padding_mask`` merging, unbatched inputs and
    return values as torch. ``need_weights=True`` (the default, as in torch)
    materialises the ``(L, S)`` weights with torch's own formulas; pass
    ``need_weights=False`` for the flash kernel. torch's inference fast path
    (``torch._native_multi_head_attention``) is never taken: every call runs the
    steps above, so results match torch's regular path.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("fastlayers.nn.MultiheadAttention does not support NestedTensor inputs")
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = _multi_head_attention_forward(
            query, key, value, self, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """A copy of ``module`` (hyperparameters, parameters, device, dtype, training mode)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.MultiheadAttention, got {type(module)}")
        weight = module.out_proj.weight
        out = cls(**mha_constructor_args(module), device=weight.device, dtype=weight.dtype)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        return out


_SCORES = ("dot", "general", "concat")


class LuongAttention(nn.Module):
    r"""Luong attention (Luong, Pham & Manning 2015) over encoder outputs, or attention pooling.

    Given a query :math:`q \in \mathbb{R}^{B \times H}` and encoder outputs
    :math:`k \in \mathbb{R}^{B \times T \times H}`, the score of step :math:`t` is

    * ``'dot'``:     :math:`s_t = q^\top k_t`
    * ``'general'``: :math:`s_t = q^\top W_a k_t`  (``W_a``: ``linear``, H x H, no bias),
      computed as :math:`(W_a^\top q)^\top k_t`
    * ``'concat'``:  :math:`s_t = v_a^\top \tanh(W_a [q; k_t])`  (``W_a``: ``linear``,
      H x 2H, no bias; ``v_a``: ``v``, H)

    then :math:`a = \mathrm{softmax}_t(s)` over the steps that are not padding
    (``mask[b, t] = True`` marks padding; a row that is all padding gets weights and a
    context of 0), and the context is :math:`c = \sum_t a_t k_t`. ``forward`` returns
    ``(context (B, H), weights (B, T))``.

    When ``query`` is omitted the module pools: the query is a learned vector
    ``pool_query`` (H), the same for every batch row. For ``'dot'`` and ``'general'`` the
    context comes from ``fastlayers.functional.scaled_dot_product_attention``
    (``scale=1.0``) and the returned weights from one (B, T) score product and a softmax
    in torch ops; ``'concat'`` uses plain torch ops throughout.
    """

    def __init__(self, hidden_size: int, score: str = "dot", device=None, dtype=None) -> None:
        super().__init__()
        if score not in _SCORES:
            raise ValueError(f"LuongAttention: score must be one of {_SCORES}, got {score!r}")
        if hidden_size <= 0:
            raise ValueError(f"LuongAttention: hidden_size must be positive, got {hidden_size}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.score = hidden_size, score
        self.pool_query = nn.Parameter(torch.empty(hidden_size, **factory))
        if score == "general":
            self.linear = nn.Linear(hidden_size, hidden_size, bias=False, **factory)
        elif score == "concat":
            self.linear = nn.Linear(2 * hidden_size, hidden_size, bias=False, **factory)
            self.v = nn.Parameter(torch.empty(hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.pool_query, -bound, bound)
        if self.score != "dot":
            self.linear.reset_parameters()
        if self.score == "concat":
            nn.init.uniform_(self.v, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, score={self.score!r}"

    def forward(
        self, encoder_outputs: torch.Tensor, query: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_outputs.dim() != 3 or encoder_outputs.shape[-1] != self.hidden_size:
            raise ValueError(
                f"LuongAttention: encoder_outputs must be (batch, steps, {self.hidden_size}), "
                f"got shape {list(encoder_outputs.shape)}"
            )
        B, T, H = encoder_outputs.shape
        if query is None:
            query = self.pool_query.expand(B, H)
        elif query.shape != (B, H):
            raise ValueError(f"LuongAttention: query must be (batch, hidden) = {[B, H]}, got shape {list(query.shape)}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"LuongAttention: mask must be a bool tensor (True = padding), got {mask.dtype}")
            if mask.shape != (B, T):
                raise ValueError(f"LuongAttention: mask must be (batch, steps) = {[B, T]}, got shape {list(mask.shape)}")

        if self.score == "concat":
            q = query.unsqueeze(1).expand(B, T, H)
            scores = torch.tanh(self.linear(torch.cat([q, encoder_outputs], dim=-1))) @ self.v
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            weights = _safe_softmax(scores)
            return (weights.unsqueeze(1) @ encoder_outputs).squeeze(1), weights

        if self.score == "general":
            query = query @ self.linear.weight  # q^T W k = (W^T q)^T k
        q = query.unsqueeze(1)  # (B, 1, H)
        visible = None if mask is None else (~mask).unsqueeze(1)  # (B, 1, T): True takes part
        context = scaled_dot_product_attention(q, encoder_outputs, encoder_outputs, visible, scale=1.0).squeeze(1)
        scores = (q @ encoder_outputs.transpose(1, 2)).squeeze(1)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return context, _safe_softmax(scores)
