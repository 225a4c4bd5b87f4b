"""`fastlayers train`: training runs, checkpoints and resume, errors, --compare-native, DDP."""

import os
import subprocess
import sys

import pytest
import torch

from fastlayers import train
from fastlayers.cli import main

pytest.importorskip("sklearn")

# A small LSTM on digits read row by row (8 steps of 8 pixels): a training epoch takes
# a fraction of a second.
TINY_LSTM = ["lstm", "--data", "digits", "--model-arg", "hidden_size=16", "--model-arg", "num_layers=1",
             "--batch-size", "128", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # --threads sets torch's process-wide count
    yield
    torch.set_num_threads(threads)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["train", *map(str, argv)])
    return code, capsys.readouterr().out


def test_training_learns_digits_and_reports_every_epoch(capsys):
    code, out = _run(capsys, "cnn", "--data", "digits", "--model-arg", "channels=(8, 16)", "--epochs", "2",
                     "--lr", "3e-3", "--device", "cpu", "--threads", "1")
    assert code == 0
    assert "epoch   1/2" in out and "epoch   2/2" in out
    final = float(out.split("final test accuracy: ")[1].split("%")[0])
    assert final > 60  # two epochs of a small CNN: far above the 10% of chance


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_optimizers_penalties_and_augmentation_run(capsys, optimizer):
    code, out = _run(capsys, *TINY_LSTM, "--epochs", "1", "--optimizer", optimizer, "--lr", "1e-2",
                     "--weight-decay", "1e-4", "--l1", "1e-5", "--augment", "--clip-grad", "1")
    assert code == 0
    assert f"optimizer={optimizer}" in out and "weight_decay=0.0001" in out and "l1=1e-05" in out
    assert "clip_grad=1.0" in out and "augmentation (sequences): random time shift" in out


def test_cosine_schedule_decays_the_learning_rate_each_epoch(capsys, tmp_path):
    path = tmp_path / "cosine.pt"
    assert _run(capsys, *TINY_LSTM, "--epochs", "4", "--lr", "0.01", "--lr-schedule", "cosine", "--checkpoint", path)[0] == 0
    lrs = [h["lr"] for h in torch.load(path, weights_only=True)["history"]]
    assert lrs == pytest.approx([0.01, 0.01 * (1 + 2**-0.5) / 2, 0.005, 0.01 * (1 - 2**-0.5) / 2])


def test_resume_continues_exactly_like_an_uninterrupted_run(capsys, tmp_path):
    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    assert _run(capsys, *TINY_LSTM, "--epochs", "3", "--augment", "--checkpoint", whole)[0] == 0
    assert _run(capsys, *TINY_LSTM, "--epochs", "1", "--augment", "--checkpoint", part)[0] == 0
    assert torch.load(part, weights_only=True)["epoch"] == 1
    code, out = _run(capsys, "--resume", part, "--epochs", "3", "--checkpoint", part)
    assert code == 0 and "resumed from" in out and "epoch   1/3" not in out and "epoch   2/3" in out
    a, b = torch.load(whole, weights_only=True), torch.load(part, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]]


def test_a_failed_checkpoint_write_leaves_the_previous_file_and_no_partial_one(capsys, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    assert _run(capsys, *TINY_LSTM, "--epochs", "1", "--checkpoint", path)[0] == 0
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(train.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _run(capsys, *TINY_LSTM, "--epochs", "1", "--checkpoint", path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_compare_native_starts_from_the_same_weights_and_reports_the_ratio(capsys):
    code, out = _run(capsys, *TINY_LSTM, "--epochs", "1", "--compare-native")
    assert code == 0
    assert "native epoch   1/1" in out and "speed: fastlayers is" in out and "test accuracy difference" in out
    accs = [float(line.split("test acc ")[1].split("%")[0]) for line in out.splitlines() if "epoch   1/1" in line]
    assert len(accs) == 2 and abs(accs[0] - accs[1]) < 2.0  # same start, same data order: nearly the same model


def test_native_twin_has_the_initial_weights_of_the_fastlayers_model():
    import copy

    import fastlayers
    from fastlayers.models import build

    model = build("attention", input_size=8, num_classes=10)
    twin = fastlayers.revert(copy.deepcopy(model))
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["transformer"], "invalid choice: 'transformer'"),
        (["lstm", "--data", "cifar"], "invalid choice: 'cifar'"),
        (["lstm", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    ],
)
def test_unknown_names_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["cnn", "--data", "mnist1d"], "needs a sequence model"),
        (["lstm", "--model-arg", "hidden=3"], "cannot build model 'lstm'"),
        (["lstm", "--epochs", "0"], "--epochs must be at least 1"),
        (["lstm", "--lr", "-1"], "--lr must be positive"),
        (["lstm", "--clip-grad", "-1"], "--clip-grad must be at least 0"),
        (["lstm", "--checkpoint", "/nonexistent/folder/x.pt"], "folder /nonexistent/folder does not exist"),
        (["--epochs", "1"], "a MODEL is required"),
        (["lstm", "--resume", "/nonexistent.pt"], "no such file"),
        (["lstm", "--device", "tpu"], "expected cpu, cuda"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert message in str(exc.value.code)


def test_unreadable_and_foreign_checkpoints_are_refused(capsys, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read it as a checkpoint"):
        main(["train", "lstm", "--resume", str(garbage)])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(SystemExit, match="not a fastlayers train checkpoint"):
        main(["train", "lstm", "--resume", str(other)])
    lstm = tmp_path / "lstm.pt"
    assert _run(capsys, *TINY_LSTM, "--epochs", "1", "--checkpoint", lstm)[0] == 0
    with pytest.raises(SystemExit, match="the checkpoint holds model 'lstm', not 'rnn'"):
        main(["train", "rnn", "--resume", str(lstm)])
    with pytest.raises(SystemExit, match="cannot be combined with --resume"):
        main(["train", "--resume", str(lstm), "--compare-native"])


def test_two_process_ddp_training_on_loopback(tmp_path):
    checkpoint = tmp_path / "ddp.pt"
    # --standalone: torchrun picks a free port for its rendezvous on localhost itself
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastlayers", "train", *TINY_LSTM, "--epochs", "2", "--checkpoint", str(checkpoint)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 processes" in result.stdout, output
    assert result.stdout.count("final test accuracy") == 1, output  # only rank 0 prints
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 2
    # each process saw half of each epoch; the loss is averaged over both halves
    assert all(h["train_loss"] > 0 for h in saved["history"])
