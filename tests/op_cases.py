"""One small forward + backward call of every fastlayers op, for the system tests
(tests/test_leaks.py, test_threads.py, test_determinism.py).

Each case builds its leaf tensors from a seed and runs the op through the public API
(so the registered op, its autograd formula and its backward op all run); `run`
returns the outputs and the gradients of a fixed random weighting of them with
respect to every leaf, computed with torch.autograd.grad (no .grad accumulation, so
threads can share the leaves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastlayers import functional as F


@dataclass(frozen=True)
class OpCase:
    name: str
    make: Callable[[torch.Generator, torch.dtype, str], list[torch.Tensor]]  # the leaves
    call: Callable[..., object]  # leaves -> outputs (a tensor or nested tuples)

    def leaves(self, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [t.to(device).requires_grad_() for t in self.make(gen, dtype, device)]

    def run(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """[outputs..., gradients of sum(w_i * out_i) w.r.t. each leaf...], detached."""
        outs = [o for o in _flatten(self.call(*leaves)) if o.is_floating_point()]
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [o.detach() for o in outs] + [g for g in grads if g is not None]


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [out]


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    out, h_n, c_n = F.lstm(x, (h0, c0), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, True, False, False)
    return out, h_n, c_n


def _rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh):
    return F.rnn(x, h0, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, True, False, False, nonlinearity="tanh")


def _sdpa(q, k, v, mask):
    # Bool masks cannot be leaves that require grad: the float leaf is thresholded.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.detach() > -1.0, enable_gqa=True)


# Shapes are small (the leak test makes 10,000 calls of each) but reach every code path
# of note: a bias, channels, stride 2 (grad-input phases), depthwise, the fused epilogues,
# a multi-step recurrence, a mask with GQA and causal attention.
CASES = [
    OpCase(
        "bias_act_gelu",
        lambda g, dt, dev: [_randn(g, 2, 8, 5, 5, dtype=dt), _randn(g, 8, dtype=dt)],
        lambda x, b: F.bias_act(x, b, "gelu"),
    ),
    OpCase(
        "bias_act_relu_channels_last",
        lambda g, dt, dev: [
            _randn(g, 2, 8, 5, 5, dtype=dt).contiguous(memory_format=torch.channels_last),
            _randn(g, 8, dtype=dt),
        ],
        lambda x, b: F.bias_act(x, b, "relu"),
    ),
    OpCase(
        "conv2d",
        lambda g, dt, dev: [_randn(g, 2, 3, 9, 9, dtype=dt), _randn(g, 6, 3, 3, 3, dtype=dt), _randn(g, 6, dtype=dt)],
        lambda x, w, b: F.conv2d(x, w, b, padding=1),
    ),
    OpCase(
        "conv2d_stride2_groups",
        lambda g, dt, dev: [_randn(g, 2, 4, 9, 9, dtype=dt), _randn(g, 6, 2, 3, 3, dtype=dt), _randn(g, 6, dtype=dt)],
        lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2),
    ),
    OpCase(
        "conv2d_depthwise_relu",
        lambda g, dt, dev: [_randn(g, 2, 8, 7, 7, dtype=dt), _randn(g, 8, 1, 3, 3, dtype=dt), _randn(g, 8, dtype=dt)],
        lambda x, w, b: F.conv2d_relu(x, w, b, padding=1, groups=8),
    ),
    OpCase(
        "conv2d_relu_max_pool2d",
        lambda g, dt, dev: [_randn(g, 2, 3, 8, 8, dtype=dt), _randn(g, 6, 3, 3, 3, dtype=dt), _randn(g, 6, dtype=dt)],
        lambda x, w, b: F.conv2d_relu_max_pool2d(x, w, b, padding=1),
    ),
    OpCase(
        "lstm_cell",
        lambda g, dt, dev: [
            _randn(g, 3, 5, dtype=dt), _randn(g, 3, 7, dtype=dt), _randn(g, 3, 7, dtype=dt),
            _randn(g, 28, 5, dtype=dt), _randn(g, 28, 7, dtype=dt), _randn(g, 28, dtype=dt), _randn(g, 28, dtype=dt),
        ],
        lambda x, h, c, w_ih, w_hh, b_ih, b_hh: F.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh),
    ),
    OpCase(
        "rnn_tanh_cell",
        lambda g, dt, dev: [
            _randn(g, 3, 5, dtype=dt), _randn(g, 3, 7, dtype=dt),
            _randn(g, 7, 5, dtype=dt), _randn(g, 7, 7, dtype=dt), _randn(g, 7, dtype=dt), _randn(g, 7, dtype=dt),
        ],
        F.rnn_tanh_cell,
    ),
    OpCase(
        "rnn_relu_cell",
        lambda g, dt, dev: [
            _randn(g, 3, 5, dtype=dt), _randn(g, 3, 7, dtype=dt),
            _randn(g, 7, 5, dtype=dt), _randn(g, 7, 7, dtype=dt), _randn(g, 7, dtype=dt), _randn(g, 7, dtype=dt),
        ],
        F.rnn_relu_cell,
    ),
    OpCase(
        "lstm_layer",
        lambda g, dt, dev: [
            _randn(g, 4, 3, 5, dtype=dt), _randn(g, 1, 3, 7, dtype=dt), _randn(g, 1, 3, 7, dtype=dt),
            _randn(g, 28, 5, dtype=dt), _randn(g, 28, 7, dtype=dt), _randn(g, 28, dtype=dt), _randn(g, 28, dtype=dt),
        ],
        _lstm_layer,
    ),
    OpCase(
        "rnn_layer",
        lambda g, dt, dev: [
            _randn(g, 4, 3, 5, dtype=dt), _randn(g, 1, 3, 7, dtype=dt),
            _randn(g, 7, 5, dtype=dt), _randn(g, 7, 7, dtype=dt), _randn(g, 7, dtype=dt), _randn(g, 7, dtype=dt),
        ],
        _rnn_layer,
    ),
    OpCase(
        "attention_gqa_mask",
        lambda g, dt, dev: [
            _randn(g, 2, 4, 9, 8, dtype=dt), _randn(g, 2, 2, 11, 8, dtype=dt), _randn(g, 2, 2, 11, 6, dtype=dt),
            _randn(g, 1, 1, 9, 11, dtype=dt),
        ],
        _sdpa,
    ),
    OpCase(
        "attention_causal",
        lambda g, dt, dev: [_randn(g, 1, 2, 70, 8, dtype=dt), _randn(g, 1, 2, 70, 8, dtype=dt), _randn(g, 1, 2, 70, 8, dtype=dt)],
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    ),
]
CASE_IDS = [c.name for c in CASES]

# Shapes large enough that the CPU kernels split their work (and, before it was made
# shape-only, the conv grad-weight its reduction) differently for 1 and 2 threads:
# pixel chunks of the conv grad-weight, partial-sum groups of the channels_last
# bias_act backward, the fused vs split attention backward (one (batch, kv head)
# pair), the row blocks of the LSTM's packed GEMMs.
PARALLEL_CASES = [
    OpCase(
        "conv2d_large",
        lambda g, dt, dev: [_randn(g, 4, 8, 20, 20, dtype=dt), _randn(g, 16, 8, 3, 3, dtype=dt), _randn(g, 16, dtype=dt)],
        lambda x, w, b: F.conv2d(x, w, b, padding=1),
    ),
    OpCase(
        "conv2d_depthwise_large",
        lambda g, dt, dev: [_randn(g, 4, 16, 20, 20, dtype=dt), _randn(g, 16, 1, 3, 3, dtype=dt), _randn(g, 16, dtype=dt)],
        lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=16),
    ),
    OpCase(
        "conv2d_relu_max_pool2d_large",
        lambda g, dt, dev: [_randn(g, 4, 8, 20, 20, dtype=dt), _randn(g, 16, 8, 3, 3, dtype=dt), _randn(g, 16, dtype=dt)],
        lambda x, w, b: F.conv2d_relu_max_pool2d(x, w, b, padding=1),
    ),
    OpCase(
        "bias_act_silu_channels_last_large",
        lambda g, dt, dev: [
            _randn(g, 4, 64, 16, 16, dtype=dt).contiguous(memory_format=torch.channels_last),
            _randn(g, 64, dtype=dt),
        ],
        lambda x, b: F.bias_act(x, b, "silu"),
    ),
    OpCase(
        "attention_one_head_causal_long",
        lambda g, dt, dev: [_randn(g, 1, 1, 300, 16, dtype=dt), _randn(g, 1, 1, 300, 16, dtype=dt), _randn(g, 1, 1, 300, 16, dtype=dt)],
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    ),
    OpCase(
        "lstm_layer_large",
        lambda g, dt, dev: [
            _randn(g, 10, 64, 32, dtype=dt), _randn(g, 1, 64, 48, dtype=dt), _randn(g, 1, 64, 48, dtype=dt),
            _randn(g, 192, 32, dtype=dt), _randn(g, 192, 48, dtype=dt), _randn(g, 192, dtype=dt), _randn(g, 192, dtype=dt),
        ],
        _lstm_layer,
    ),
]
