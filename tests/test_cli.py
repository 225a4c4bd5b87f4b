"""The command line: commands registered, check, bench, demo."""

import json

import pytest
import torch

from fastlayers import bench
from fastlayers.cli import build_parser, main
from helpers import requires_extension


def test_every_command_is_registered_with_help(capsys):
    for name in ("info", "train", "demo", "bench", "check"):
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: fastlayers {name}" in capsys.readouterr().out


def test_train_help_lists_every_option():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for option in ("--data", "--epochs", "--batch-size", "--optimizer", "--lr", "--weight-decay", "--l1",
                   "--augment", "--seed", "--checkpoint", "--resume", "--device", "--compare-native"):
        assert option in text


@requires_extension
def test_check_passes_on_every_op(capsys):
    from fastlayers import check

    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and " passed in " in out
    ops = {case.op for case in check.cases(torch.device("cpu"), torch.float32)}
    assert ops == {"bias_act", "conv2d", "conv2d + relu", "conv2d + relu + max_pool2d", "conv1d", "lstm cell",
                   "rnn cell", "lstm layer", "rnn layer", "attention"}


def test_check_reports_a_kernel_that_disagrees_with_its_reference(monkeypatch, capsys):
    from fastlayers import check

    real = check._forward_backward

    def skewed(case, backend):  # the "kernel" of every case is off by 1e-3
        outputs, grads = real(case, backend)
        return ([o + 1e-3 for o in outputs], grads) if backend == "kernels" else (outputs, grads)

    monkeypatch.setattr(check, "_forward_backward", skewed)
    rows = check.run_checks(check.check_devices()[0])
    assert rows and not any(r["passed"] for r in rows)


@pytest.mark.skipif(not bench.benchmarks_dir().joinpath("harness.py").is_file(),
                    reason="benchmark scripts not installed with the package")
@requires_extension
def test_bench_quick_runs_one_benchmark_into_the_output_folder(tmp_path, capfd):
    assert main(["bench", "--op", "bias_act", "--quick", "--out", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert "speedup" in out and f"results in {tmp_path}" in out
    runs = json.loads((tmp_path / "bias_act.json").read_text())
    assert runs[-1]["results"] and all(r["speedup"] > 0 for r in runs[-1]["results"])
    assert (tmp_path / "bias_act.png").is_file()


def test_demo_with_one_epoch_prints_the_table_and_saves_the_plot(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out_png = tmp_path / "demo.png"
    assert main(["demo", "--models", "cnn", "--epochs", "1", "--out", str(out_png), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fastlayers demo" in out and "cnn" in out and "speedup" in out
    assert "target missed" in out or "97%" in out
    assert out_png.is_file() and out_png.stat().st_size > 10_000
