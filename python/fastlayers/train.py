"""``fastlayers train``: train a documented model (``fastlayers.models``) on a dataset
(``fastlayers.data``), optionally against its native twin, on one process or many.

Reproducibility: every epoch starts from ``torch.manual_seed(seed + epoch)`` and draws
its shuffling and augmentation from generators seeded by (seed, epoch), so a run
resumed from the checkpoint of epoch k continues exactly as the uninterrupted run.
Checkpoints hold the model's state_dict, the optimizer's, the completed epochs, the
history and what is needed to rebuild the model; they are written to a temporary file
in the same folder and renamed, so a failure never leaves a partial checkpoint.

Multi-process: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel (gloo on the CPU, nccl on CUDA), each process sees its share of
every epoch through a DistributedSampler (``--batch-size`` is per process), and only
rank 0 prints, evaluates and writes checkpoints.
"""

from __future__ import annotations

import argparse
import ast
import copy
import gc
import inspect
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastlayers import data as fl_data

CHECKPOINT_FORMAT = "fastlayers-train-1"
OPTIMIZERS = ("sgd", "adam", "rmsprop")
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_DATA = {"image": "digits", "sequence": "mnist1d"}
EVAL_BATCH_SIZE = 512


class TrainError(SystemExit):
    """A user error (bad argument, bad checkpoint): exits with status 1 and this message on stderr."""

    def __init__(self, message: str):
        super().__init__(f"fastlayers train: error: {message}")


@dataclass
class Hyper:
    """Training settings (all saved in the checkpoint)."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": lr * (1 + cos(pi * epoch / epochs)) / 2 in each epoch
    weight_decay: float = 0.0  # L2, as the optimizer's weight_decay
    l1: float = 0.0  # coefficient of sum(|p|) over all parameters, added to the loss
    augment: bool = False
    seed: int = 0
    clip_grad: float = 0.0  # max global gradient norm; 0: no clipping


def model_kind(name: str) -> str:
    """"image" for models built with an image_size, else "sequence"."""
    from fastlayers.models import MODELS

    return "image" if "image_size" in inspect.signature(MODELS[name]).parameters else "sequence"


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


@dataclass
class Distributed:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed | None:
    """The torchrun process group (WORLD_SIZE > 1 in the environment), else None."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    return Distributed(int(os.environ["RANK"]), world_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """Trains one model epoch by epoch; holds its optimizer and per-epoch history."""

    def __init__(self, label: str, model: torch.nn.Module, dataset: fl_data.Dataset, hyper: Hyper,
                 device: torch.device, distributed: Distributed | None = None):
        self.label, self.dataset, self.hyper, self.device, self.distributed = label, dataset, hyper, device, distributed
        self.model = model.to(device)  # the bare module: evaluation, state_dict
        self.optimizer = make_optimizer(hyper.optimizer, self.model.parameters(), hyper.lr, hyper.weight_decay)
        self.forward_model = self.model
        if distributed is not None:
            ids = [device.index] if device.type == "cuda" else None
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.history: list[dict] = []

    def release_ddp(self) -> None:
        """Drops the DistributedDataParallel wrapper (its reducer holds gloo/nccl work);
        the bare model stays usable."""
        self.forward_model = self.model

    def load_state(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.history = list(checkpoint["history"])

    def batches(self, epoch: int):
        seed = self.hyper.seed * 100_003 + epoch
        if self.distributed is None:
            return fl_data.loader(self.dataset.train, self.hyper.batch_size, shuffle=True, seed=seed)
        sampler = torch.utils.data.DistributedSampler(
            self.dataset.train, self.distributed.world_size, self.distributed.rank, shuffle=True, seed=self.hyper.seed
        )
        sampler.set_epoch(epoch)
        return fl_data.loader(self.dataset.train, self.hyper.batch_size, sampler=sampler)

    def epoch_lr(self, epoch: int) -> float:
        if self.hyper.lr_schedule == "cosine":
            return self.hyper.lr * (1 + math.cos(math.pi * epoch / self.hyper.epochs)) / 2
        return self.hyper.lr

    def run_epoch(self, epoch: int, on_batch=None) -> dict:
        """Trains one epoch (0-based `epoch`), evaluates, appends and returns its record."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.epoch_lr(epoch)
        torch.manual_seed(self.hyper.seed + epoch)  # dropout and any other torch randomness
        rank = self.distributed.rank if self.distributed else 0
        augment_rng = torch.Generator().manual_seed((self.hyper.seed * 100_003 + epoch) * 1009 + rank)
        self.model.train()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        _sync(self.device)
        start = time.perf_counter()
        for x, y in self.batches(epoch):
            if self.hyper.augment:
                x = fl_data.augment(x, self.dataset.kind, augment_rng)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits = self.forward_model(x)
            loss = F.cross_entropy(logits, y)
            objective = loss
            if self.hyper.l1:
                objective = loss + self.hyper.l1 * sum(p.abs().sum() for p in self.model.parameters())
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if self.hyper.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hyper.clip_grad)
            self.optimizer.step()
            totals += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
            if on_batch is not None:
                on_batch()
        _sync(self.device)
        seconds = time.perf_counter() - start
        if self.distributed is not None:
            dist.all_reduce(totals)
        record = {
            "epoch": epoch + 1,
            "train_loss": totals[0].item() / totals[2].item(),
            "train_acc": totals[1].item() / totals[2].item(),
            "test_acc": self.evaluate() if self.distributed is None or self.distributed.is_main else None,
            "seconds": seconds,
            "lr": self.epoch_lr(epoch),
        }
        self.history.append(record)
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        correct = 0
        for x, y in fl_data.loader(self.dataset.test, EVAL_BATCH_SIZE):
            correct += (self.model(x.to(self.device)).argmax(1).cpu() == y).sum().item()
        return correct / len(self.dataset.test)

    def seconds_per_epoch(self) -> float:
        return statistics.median(r["seconds"] for r in self.history)

    def final_test_acc(self) -> float:
        return self.history[-1]["test_acc"]


# ---- checkpoints --------------------------------------------------------------------


def check_writable(path: Path) -> None:
    """Fails early (before training) when a checkpoint could not be written at `path`."""
    if path.is_dir():
        raise TrainError(f"--checkpoint {path}: is a directory, expected a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TrainError(f"--checkpoint {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TrainError(f"--checkpoint {path}: folder {parent} is not writable")


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Writes `checkpoint` to a temporary file next to `path`, then renames it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise TrainError(f"--resume {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of every kind: the file is not a checkpoint
        raise TrainError(f"--resume {path}: cannot read it as a checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume {path}: not a fastlayers train checkpoint")
    return checkpoint


def make_checkpoint(name: str, data_name: str, model_kwargs: dict, trainer: Trainer) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": name,
        "data": data_name,
        "model_kwargs": model_kwargs,
        "hyper": asdict(trainer.hyper),
        "epoch": len(trainer.history),
        "model_state": trainer.model.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "history": trainer.history,
    }


# ---- command line -------------------------------------------------------------------


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string such as score=general


def arguments(parser: argparse.ArgumentParser) -> None:
    from fastlayers.models import MODELS

    parser.add_argument("model", nargs="?", choices=sorted(MODELS), metavar="MODEL",
                        help=f"one of {', '.join(sorted(MODELS))} (taken from the checkpoint with --resume)")
    parser.add_argument("--data", choices=fl_data.DATASETS,
                        help="dataset (default: digits for image models, mnist1d for sequence models)")
    parser.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="model constructor argument, e.g. hidden_size=64 (repeatable)")
    defaults = Hyper()
    parser.add_argument("--epochs", type=int, help=f"total epochs (default {defaults.epochs})")
    parser.add_argument("--batch-size", type=int, help=f"per process (default {defaults.batch_size})")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {defaults.optimizer} (sgd: momentum 0.9)")
    parser.add_argument("--lr", type=float, help=f"learning rate (default {defaults.lr})")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                        help="constant (default) or cosine: lr * (1 + cos(pi * epoch / epochs)) / 2 each epoch")
    parser.add_argument("--weight-decay", type=float, help="L2 penalty, as the optimizer's weight_decay (default 0)")
    parser.add_argument("--l1", type=float, help="L1 penalty: adds l1 * sum(|p|) over all parameters to the loss (default 0)")
    parser.add_argument("--augment", action="store_true", default=None,
                        help="images: " + fl_data.AUGMENTATION["image"] + "; sequences: " + fl_data.AUGMENTATION["sequence"])
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    parser.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the global gradient norm (default: off)")
    parser.add_argument("--checkpoint", type=Path, metavar="PATH", help="write a checkpoint here after every epoch")
    parser.add_argument("--resume", type=Path, metavar="PATH", help="continue from this checkpoint up to --epochs")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; torchrun sets 1 a process)")
    parser.add_argument("--compare-native", action="store_true",
                        help="also train the torch.nn twin from the same initial weights and compare")


def resolve_device(text: str, distributed: Distributed | None) -> torch.device:
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise TrainError(f"--device {text!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {text!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {text}: no CUDA device is visible")
        if distributed is not None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise TrainError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _settings(args: argparse.Namespace, checkpoint: dict | None) -> tuple[str, str, dict, Hyper]:
    """Model name, data name, user model kwargs and hyper-parameters from the command line,
    completed from the checkpoint when resuming (explicit options win, except the model,
    its arguments, the data and the optimizer, which must match)."""
    from fastlayers.models import MODELS

    name, data_name, user_kwargs = args.model, args.data, dict(args.model_arg)
    saved = Hyper(**checkpoint["hyper"]) if checkpoint else Hyper()
    if checkpoint and args.compare_native:
        raise TrainError("--compare-native cannot be combined with --resume: both must start from the same weights")
    if checkpoint:
        for what, given, held in (("model", name, checkpoint["model"]), ("--data", data_name, checkpoint["data"]),
                                  ("--optimizer", args.optimizer, saved.optimizer)):
            if given is not None and given != held:
                raise TrainError(f"--resume {args.resume}: the checkpoint holds {what} {held!r}, not {given!r}")
        if user_kwargs:
            raise TrainError("--model-arg cannot be combined with --resume: the checkpoint fixes the model")
        name, data_name = checkpoint["model"], checkpoint["data"]
        if name not in MODELS:
            raise TrainError(f"--resume {args.resume}: unknown model {name!r} in the checkpoint")
    if name is None:
        raise TrainError("a MODEL is required (or --resume PATH)")
    data_name = data_name or DEFAULT_DATA[model_kind(name)]
    hyper = Hyper(**{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in asdict(saved).items()})
    for field, least in (("epochs", 1), ("batch_size", 1), ("weight_decay", 0), ("l1", 0), ("clip_grad", 0)):
        if getattr(hyper, field) < least:
            raise TrainError(f"--{field.replace('_', '-')} must be at least {least}, got {getattr(hyper, field)}")
    if hyper.lr <= 0:
        raise TrainError(f"--lr must be positive, got {hyper.lr}")
    return name, data_name, user_kwargs, hyper


def build_model(name: str, model_kwargs: dict) -> torch.nn.Module:
    from fastlayers.models import build

    try:
        return build(name, **model_kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"cannot build model {name!r} with {model_kwargs}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from fastlayers.cli import console as make_console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import fastlayers

    distributed = distributed_from_env()
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    name, data_name, user_kwargs, hyper = _settings(args, checkpoint)
    if args.checkpoint:
        check_writable(args.checkpoint)
    device = resolve_device(args.device, distributed)
    set_threads(args.threads)
    is_main = distributed is None or distributed.is_main
    console = make_console(quiet=not is_main)

    try:
        dataset = fl_data.load(data_name, model_kind(name))
    except ValueError as exc:
        raise TrainError(f"--data {data_name}: {exc}") from None
    model_kwargs = checkpoint["model_kwargs"] if checkpoint else {**dataset.model_kwargs, **user_kwargs}

    if distributed is not None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    finished = False
    trainers: list[Trainer] = []
    try:
        torch.manual_seed(hyper.seed)  # initial weights
        model = build_model(name, model_kwargs)
        trainers.append(Trainer("fastlayers", model, dataset, hyper, device, distributed))
        if args.compare_native:
            twin = fastlayers.revert(copy.deepcopy(model))
            trainers.append(Trainer("native", twin, dataset, hyper, device, distributed))
        start_epoch = 0
        if checkpoint:
            trainers[0].load_state(checkpoint)
            start_epoch = checkpoint["epoch"]

        shape = tuple(dataset.train[0][0].shape)
        console.print(f"{name} on {data_name}: {len(dataset.train)} train / {len(dataset.test)} test samples of shape "
                      f"{shape}, {dataset.num_classes} classes{'; ' + dataset.note if dataset.note else ''}")
        console.print(f"model {model_kwargs}, {sum(p.numel() for p in model.parameters())} parameters; device {device}"
                      + (f", {distributed.world_size} processes" if distributed else ""))
        console.print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(hyper).items()))
        if hyper.augment:
            console.print(f"augmentation ({dataset.kind}s): {fl_data.AUGMENTATION[dataset.kind]}")
        if start_epoch:
            console.print(f"resumed from {args.resume} after epoch {start_epoch}")
        if start_epoch >= hyper.epochs:
            console.print(f"nothing to do: the checkpoint has {start_epoch} epochs, --epochs is {hyper.epochs}")

        batches = len(trainers[0].batches(0))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=not is_main) as progress:
            for epoch in range(start_epoch, hyper.epochs):
                for trainer in trainers:
                    task = progress.add_task(f"{trainer.label} epoch {epoch + 1}/{hyper.epochs}", total=batches)
                    record = trainer.run_epoch(epoch, on_batch=lambda: progress.advance(task))
                    progress.remove_task(task)
                    test = f"{record['test_acc']:.2%}" if record["test_acc"] is not None else "-"
                    console.print(f"{trainer.label:>10} epoch {epoch + 1:>3}/{hyper.epochs}: loss {record['train_loss']:.4f}"
                                  f"  train acc {record['train_acc']:.2%}  test acc {test}  {record['seconds']:.2f} s")
                if args.checkpoint and is_main:
                    save_checkpoint(args.checkpoint, make_checkpoint(name, data_name, model_kwargs, trainers[0]))
                if distributed is not None:
                    dist.barrier()

        main = trainers[0]
        if main.history and is_main:
            console.print(f"final test accuracy: {main.final_test_acc():.2%}")
            if args.checkpoint:
                console.print(f"checkpoint: {args.checkpoint} (epoch {len(main.history)})")
        if args.compare_native and is_main and main.history:
            native = trainers[1]
            table = Table(title=f"{name} on {data_name}: fastlayers vs torch.nn, same initial weights")
            for column in ("layers", "s / epoch (median)", "test acc"):
                table.add_column(column, justify="right")
            for t in trainers:
                table.add_row(t.label, f"{t.seconds_per_epoch():.3f}", f"{t.final_test_acc():.2%}")
            console.print(table)
            console.print(f"speed: fastlayers is {native.seconds_per_epoch() / main.seconds_per_epoch():.2f}x native per epoch; "
                          f"test accuracy difference {100 * (main.final_test_acc() - native.final_test_acc()):+.2f} points")
        finished = True
    finally:
        if distributed is not None:
            # The DDP wrappers go before the process group. Left to interpreter exit, a
            # rank could abort after training ("terminate called without an active
            # exception", exit -6): 5 of 27 two-process runs with both cores busy (and one
            # CI run), none of 18 with the wrappers released and collected first.
            for trainer in trainers:
                trainer.release_ddp()
            gc.collect()
            if finished:  # all ranks done before any tears down gloo's connections (else: abort at exit)
                dist.barrier()
            dist.destroy_process_group()
    return 0
