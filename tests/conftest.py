import os
import sys

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    # CI sets FASTLAYERS_REQUIRE_EXTENSION=1: a missing or broken build must fail the
    # run, not quietly turn every kernel test into a test of the reference.
    if os.environ.get("FASTLAYERS_REQUIRE_EXTENSION") == "1":
        from fastlayers import _extension

        if not _extension.available():
            raise pytest.UsageError(f"fastlayers extension failed to load: {_extension.load_error}")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _fixed_seed_and_backend():
    import fastlayers

    torch.manual_seed(0)
    with fastlayers.use_backend("kernels"):
        yield


@pytest.fixture(params=["base", "avx2", "avx512"])
def cpu_isa(request):
    """Runs the test once per CPU ISA (base, avx2, avx512); skips those not compiled in
    or not supported by this CPU."""
    from fastlayers import _extension

    if not _extension.available():
        pytest.skip("extension not built")
    if request.param not in _extension._C.available_cpu_isas():
        pytest.skip(f"CPU ISA {request.param} not available here")
    previous = _extension._C.cpu_isa()
    _extension._C.set_cpu_isa(request.param)
    yield request.param
    _extension._C.set_cpu_isa(previous)


def pytest_terminal_summary(terminalreporter):
    # tests/test_fuzz.py counts the hypothesis cases it ran (both budgets: default and
    # FASTLAYERS_FUZZ_EXAMPLES).
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.CASES:
        parts = ", ".join(f"{name} {count}" for name, count in sorted(fuzz.CASES.items()))
        terminalreporter.write_line(f"fuzz cases run: {sum(fuzz.CASES.values())} ({parts})")
