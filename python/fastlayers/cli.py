"""``python -m fastlayers <command>`` (also the ``fastlayers`` console script).

Each command is a function registered with ``@command``: it adds its arguments to
its own sub-parser and runs with the parsed namespace, returning an exit code. Larger
commands live in their own modules (train, demo, check, bench), imported when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``fn(args) -> int`` as the sub-command `name`."""

    def register(fn: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = (help, arguments, fn)
        return fn

    return register


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")


@command("info", "versions, CPU ISAs and CUDA architectures built, devices visible", _info_arguments)
def _info(args: argparse.Namespace) -> int:
    from fastlayers.info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def console(quiet: bool = False):
    """A rich console for the commands' tables and progress bars; 120 columns when the
    output is not a terminal (rich would wrap tables at 80)."""
    from rich.console import Console

    return Console(highlight=False, quiet=quiet, width=None if sys.stdout.isatty() else 120)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from fastlayers.train import arguments

    arguments(parser)


@command("train", "train a documented model (fastlayers.models) on digits, MNIST-1D or random data", _train_arguments)
def _train(args: argparse.Namespace) -> int:
    from fastlayers.train import run

    return run(args)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from fastlayers.demo import arguments

    arguments(parser)


@command("demo", "train each documented model with fastlayers and with torch.nn layers; table and plot", _demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    from fastlayers.demo import run

    return run(args)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from fastlayers.bench import arguments

    arguments(parser)


@command("bench", "run the kernel benchmarks against native PyTorch; JSON and PNG results", _bench_arguments)
def _bench(args: argparse.Namespace) -> int:
    from fastlayers.bench import run

    return run(args)


@command("check", "self-test: every op on every device against its reference, forward and backward")
def _check(args: argparse.Namespace) -> int:
    from fastlayers.check import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlayers", description="fastlayers command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, arguments, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.set_defaults(run=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args)
