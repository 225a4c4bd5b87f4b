"""Determinism under torch.use_deterministic_algorithms(True): every op, forward and
backward, gives bitwise-equal results on reruns, with 1 and 2 threads (and the same
bits for both), or raises as torch does.

CPU: every fastlayers kernel is deterministic (fixed reduction orders, splits that
depend on the shape only). Deterministic mode also makes torch fill the memory of
torch.empty with NaN, so an output element a kernel forgot to write shows up here.
CUDA: no kernel uses atomics except the conv grad-weight, whose depth split adds
partial sums with atomicAdd; in deterministic mode it runs unsplit (one atomicAdd per
element onto zero), so it is deterministic too. The LSTM/RNN GEMMs are cuBLAS through
ATen, which raises in deterministic mode unless CUBLAS_WORKSPACE_CONFIG is set, as for
torch.nn.LSTM.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import requires_cuda_kernels, requires_extension
from op_cases import CASES, PARALLEL_CASES

pytestmark = requires_extension

ALL_CASES = CASES + PARALLEL_CASES
ALL_IDS = [c.name for c in ALL_CASES]


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _assert_bitwise_equal(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: result {i} (outputs first, then gradients) differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_reruns_are_bitwise_equal_with_one_and_two_threads(case, dtype, deterministic):
    threads = torch.get_num_threads()
    try:
        runs = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = case.leaves(dtype=dtype)
            first, second = case.run(leaves), case.run(leaves)
            _assert_bitwise_equal(first, second, f"{case.name} with {n} thread(s), rerun")
            assert all(not t.isnan().any() for t in first), f"{case.name}: NaN (an unwritten output element?)"
            runs[n] = first
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(runs[1], runs[2], f"{case.name}: 1 thread vs 2 threads")


CUDA_CASES = [c for c in ALL_CASES if not c.name.startswith(("lstm", "rnn"))]


@requires_cuda_kernels
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c.name for c in CUDA_CASES])
def test_cuda_reruns_are_bitwise_equal(case, dtype, deterministic):
    leaves = case.leaves(dtype=dtype, device="cuda")
    first, second = case.run(leaves), case.run(leaves)
    _assert_bitwise_equal(first, second, f"{case.name} on CUDA, rerun")


@requires_cuda_kernels
@pytest.mark.cuda
def test_cuda_conv_weight_grad_is_deterministic_only_in_deterministic_mode():
    # Enough pixels for several depth splits: the default mode sums them atomically.
    x = torch.randn(8, 16, 64, 64, device="cuda")
    grad = torch.randn(8, 32, 64, 64, device="cuda")
    args = ([32, 16, 3, 3], [1, 1], [1, 1], [1, 1], 1)
    op = torch.ops.fastlayers.conv2d_backward_weight
    torch.use_deterministic_algorithms(True)
    try:
        runs = [op(grad, x, *args) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    torch.testing.assert_close(runs[0], op(grad, x, *args), rtol=1e-5, atol=1e-4)


@requires_cuda_kernels
@pytest.mark.cuda
@pytest.mark.parametrize("cell", ["lstm_layer", "rnn_layer", "lstm_cell", "rnn_tanh_cell"])
def test_cuda_recurrent_ops_need_cublas_workspace_config_as_torch_does(cell, deterministic):
    case = next(c for c in CASES if c.name == cell)
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8"):
        leaves = case.leaves(device="cuda")
        _assert_bitwise_equal(case.run(leaves), case.run(leaves), f"{cell} on CUDA, rerun")
    else:
        with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG"):
            case.run(case.leaves(device="cuda"))
