"""The package around the ops: build info, the backend switch, the command line, the
CPU ISA dispatch and the FMA-peak measurement."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastlayers
from fastlayers import _extension
from fastlayers.cli import main
from helpers import cpu_isas, requires_extension


def test_info_reports_versions_isas_and_cuda():
    data = fastlayers.info()
    assert data["fastlayers"] == fastlayers.__version__
    assert data["torch"] == torch.__version__
    assert data["backend"] == "kernels"
    if _extension.available():
        assert data["built_against_torch"] == torch.__version__.split("+")[0]
        assert "base" in data["cpu_isas_compiled"]
        assert data["cpu_isa_active"] in data["cpu_isas_compiled"]
    assert data["gpus"] == ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                            if torch.cuda.is_available() else [])


@pytest.mark.skipif(os.environ.get("FASTLAYERS_CUDA") != "on", reason="the build was not asked for CUDA kernels")
def test_cuda_kernels_were_built_for_sm80_and_sm90_when_asked():
    data = fastlayers.info()
    assert data["cuda_kernels"] is True
    archs = data["cuda_archs"]
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert archs == "sm_80, sm_90, compute_90 (PTX)"


def test_cuda_arch_list_is_spelled_as_sm_and_ptx():
    from fastlayers.info import describe_cuda_archs

    assert describe_cuda_archs("8.0 9.0+PTX") == "sm_80, sm_90, compute_90 (PTX)"
    assert describe_cuda_archs("8.6;9.0a") == "sm_86, sm_90a"
    assert describe_cuda_archs(None) is None


def test_python_m_fastlayers_info_runs():
    out = subprocess.run([sys.executable, "-m", "fastlayers", "info"], capture_output=True, text=True, check=True)
    assert "cuda_kernels" in out.stdout and "cpu_isa_active" in out.stdout


def test_cli_info_json(capsys):
    import json

    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fastlayers"] == fastlayers.__version__


def test_cli_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_backend_switch_and_context_manager_restore():
    assert fastlayers.get_backend() == "kernels"
    with fastlayers.use_backend("reference"):
        assert fastlayers.get_backend() == "reference"
        with fastlayers.use_backend("kernels"):
            assert fastlayers.get_backend() == "kernels"
        assert fastlayers.get_backend() == "reference"
    assert fastlayers.get_backend() == "kernels"
    fastlayers.set_backend("reference")
    try:
        assert fastlayers.get_backend() == "reference"
    finally:
        fastlayers.set_backend("kernels")
    with pytest.raises(ValueError, match="unknown fastlayers backend 'cudnn'"):
        fastlayers.set_backend("cudnn")


def test_backend_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError), fastlayers.use_backend("reference"):
        raise RuntimeError("boom")
    assert fastlayers.get_backend() == "kernels"


def test_devices_without_kernels_fall_back_to_the_reference():
    from fastlayers.backend import use_kernels

    assert use_kernels(torch.device("cpu")) == _extension.available()
    assert use_kernels(torch.device("meta")) is False
    with fastlayers.use_backend("reference"):
        assert use_kernels(torch.device("cpu")) is False


def test_import_without_the_extension_falls_back_with_a_warning(tmp_path):
    # A copy of the Python package without _C: importing warns and every op still works.
    import shutil

    package = tmp_path / "fastlayers"
    shutil.copytree(os.path.dirname(fastlayers.__file__), package,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastlayers\n"
        "assert any('could not be loaded' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "from fastlayers.functional import bias_act\n"
        "x = torch.randn(2, 3, 4)\n"
        "torch.testing.assert_close(bias_act(x, torch.ones(3), 'relu'), torch.relu(x + 1))\n"
        "assert fastlayers.info()['extension_loaded'] is False\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


@requires_extension
def test_cpu_isa_switch_rejects_unknown_or_unavailable_isas():
    C = _extension._C
    previous = C.cpu_isa()
    try:
        for isa in cpu_isas():
            C.set_cpu_isa(isa)
            assert C.cpu_isa() == isa
        with pytest.raises(ValueError, match="unknown CPU ISA"):
            C.set_cpu_isa("sse9")
    finally:
        C.set_cpu_isa(previous)


@requires_extension
def test_fma_peak_is_positive_and_rejects_zero_threads():
    C = _extension._C
    one = C.measure_fma_peak_gflops(1, 0.1)
    assert one > 1.0
    with pytest.raises(ValueError):
        C.measure_fma_peak_gflops(0, 0.1)
