"""Thread safety: fastlayers ops called concurrently from several Python threads, forward
and autograd backward, while the intra-op thread count changes, give bitwise the same
results as serial calls.

What makes this hold (csrc): the ops keep no mutable state between calls (scratch
buffers and packed weights are allocated per call; the kernel tables are const); every
reduction is split by the shape only, never by the thread count, so 1 and 2 threads
give the same bits. The one process-wide setting, the CPU ISA cap
(fastlayers._C.set_cpu_isa), is an atomic read by each call: changing it while other
threads run ops is safe (results stay correct, no crash), but a call may then mix
ISAs, whose float rounding differs (FMA or not), so bitwise equality with serial
calls holds only while the ISA stays fixed; test_cpu_isa_switch_during_concurrent_calls
checks the weaker guarantee.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from fastlayers import _extension
from helpers import requires_extension
from op_cases import CASES, PARALLEL_CASES

pytestmark = requires_extension

WORKERS = 4
ROUNDS = 20  # each worker: ROUNDS passes over the cases, ~300 calls


def _serial_results(cases):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return {c.name: c.run(c.leaves()) for c in cases}
    finally:
        torch.set_num_threads(threads)


def _run_concurrently(worker, workers: int = WORKERS, toggle_threads: bool = True):
    """Runs worker(index) on `workers` Python threads while another thread flips
    torch.set_num_threads between 1 and 2; re-raises the first worker error."""
    errors: list[BaseException] = []
    stop = threading.Event()
    threads_before = torch.get_num_threads()

    def guarded(index):
        try:
            worker(index)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    def toggler():
        n = 1
        while not stop.is_set():
            torch.set_num_threads(n)
            n = 3 - n
            stop.wait(0.002)

    pool = [threading.Thread(target=guarded, args=(i,)) for i in range(workers)]
    flipper = threading.Thread(target=toggler) if toggle_threads else None
    try:
        if flipper:
            flipper.start()
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in pool), "a worker thread hung"
    finally:
        stop.set()
        if flipper:
            flipper.join()
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]


def test_concurrent_forward_and_backward_match_serial_results_bitwise():
    cases = CASES + PARALLEL_CASES
    expected = _serial_results(cases)
    leaves = {c.name: c.leaves() for c in cases}  # shared by all workers (read-only)
    calls = [0] * WORKERS

    def worker(index):
        rng = random.Random(index)
        for round_ in range(ROUNDS):
            order = list(cases)
            rng.shuffle(order)
            for case in order:
                # Each worker also changes its own intra-op thread count between calls.
                torch.set_num_threads(1 + (round_ + index) % 2)
                got = case.run(leaves[case.name])
                for i, (a, b) in enumerate(zip(got, expected[case.name], strict=True)):
                    assert torch.equal(a, b), f"{case.name}: result {i} differs from the serial call"
                calls[index] += 1

    _run_concurrently(worker)
    assert sum(calls) == WORKERS * ROUNDS * len(cases)


def test_cpu_isa_switch_during_concurrent_calls_keeps_results_correct():
    isas = list(_extension._C.available_cpu_isas())
    if len(isas) < 2:
        pytest.skip("needs two CPU ISAs to switch between")
    expected = _serial_results(CASES)
    leaves = {c.name: c.leaves() for c in CASES}
    previous = _extension._C.cpu_isa()
    stop = threading.Event()

    def switcher():
        i = 0
        while not stop.is_set():
            _extension._C.set_cpu_isa(isas[i % len(isas)])
            i += 1
            stop.wait(0.001)

    def worker(index):
        for _ in range(5):
            for case in CASES:
                got = case.run(leaves[case.name])
                for a, b in zip(got, expected[case.name], strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{case.name}: {m}")

    thread = threading.Thread(target=switcher)
    thread.start()
    try:
        _run_concurrently(worker, workers=2, toggle_threads=False)
    finally:
        stop.set()
        thread.join()
        _extension._C.set_cpu_isa(previous)
