"""Long-running use does not leak: 10,000 forward + backward calls of every op keep the
resident memory flat, and an op's outputs are freed as soon as the caller drops them
and the graph that saved them (no reference cycle through the autograd context that
only the garbage collector would break)."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from helpers import requires_extension
from op_cases import CASES, _flatten

pytestmark = requires_extension

CALLS = 10_000
WARMUP_CALLS = 500
# Allowed growth of the resident set over the 10,000 measured calls: 2 MiB, i.e. about
# 200 bytes a call. The smallest real leak, one TensorImpl (~200 bytes with its
# storage header; measured: 10,000 empty tensors kept = 3.6 MiB) or one of these
# ops' smallest outputs (>= 400 bytes) kept per call,
# crosses it; what stays below is allocator noise: malloc arenas and torch's/Python's
# free lists settle during the warm-up, after which repeated same-shape calls reuse
# the same blocks (measured growth here: 0-200 KiB).
RSS_TOLERANCE_BYTES = 2 * 1024 * 1024

# One case per op (the forward and its backward op): test_threads/test_determinism run
# all of op_cases.CASES; here 10,000 calls of each must fit a CI budget of ~15 s.
LEAK_CASES = [
    c
    for c in CASES
    if c.name
    in {
        "bias_act_gelu",
        "conv2d_stride2_groups",
        "conv2d_relu_max_pool2d",
        "lstm_cell",
        "rnn_tanh_cell",
        "lstm_layer",
        "rnn_layer",
        "attention_gqa_mask",
    }
]


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _forward_backward(case, leaves, grad_outputs):
    outs = [o for o in _flatten(case.call(*leaves)) if o.is_floating_point()]
    torch.autograd.grad(outs, leaves, grad_outputs=grad_outputs, allow_unused=True)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
@pytest.mark.parametrize("case", LEAK_CASES, ids=[c.name for c in LEAK_CASES])
def test_ten_thousand_forward_backward_calls_keep_resident_memory_flat(case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no OpenMP wake-ups, the same allocations every call
    try:
        leaves = case.leaves()
        outs = [o for o in _flatten(case.call(*leaves)) if o.is_floating_point()]
        grad_outputs = [torch.ones_like(o) for o in outs]
        for _ in range(WARMUP_CALLS):
            _forward_backward(case, leaves, grad_outputs)
        gc.collect()
        before = resident_bytes()
        for _ in range(CALLS):
            _forward_backward(case, leaves, grad_outputs)
        gc.collect()
        growth = resident_bytes() - before
    finally:
        torch.set_num_threads(threads)
    assert growth <= RSS_TOLERANCE_BYTES, (
        f"{case.name}: resident memory grew by {growth / 1024:.0f} KiB over {CALLS} forward+backward calls "
        f"(allowed {RSS_TOLERANCE_BYTES / 1024:.0f} KiB)"
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_and_graph_are_freed_without_the_garbage_collector(case):
    leaves = case.leaves()
    gc.collect()
    gc.disable()  # a reference cycle would now keep the tensors alive: the test sees it
    try:
        outs = [o for o in _flatten(case.call(*leaves)) if o.is_floating_point()]
        refs = [weakref.ref(o) for o in outs]
        assert all(o.grad_fn is not None for o in outs), "the op's outputs should carry an autograd graph"
        loss = sum(o.sum() for o in outs)
        del outs
        torch.autograd.grad(loss, leaves, allow_unused=True)
        del loss
        alive = [r for r in refs if r() is not None]
    finally:
        gc.enable()
    assert not alive, f"{case.name}: {len(alive)} of its outputs outlive their last reference"
