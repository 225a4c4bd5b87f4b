"""``fastlayers bench``: runs the kernel benchmarks shipped with the package.

The scripts (``bench_<op>.py`` on the shared ``harness.py``) are installed as
``fastlayers/benchmarks``; each runs in its own process, prints its table (medians,
speedup over native PyTorch, GFLOP/s and % of the measured FMA peak or GB/s) and
writes ``<op>.json`` and ``<op>.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

OPS = ("conv", "lstm", "attention", "bias_act")


def benchmarks_dir() -> Path:
    """The installed benchmark scripts (the wheel puts them next to the package's modules)."""
    return Path(__file__).resolve().parent / "benchmarks"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", choices=[*OPS, "all"], default="all", help="which benchmark (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter timings")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("fastlayers-bench"),
                        help="folder for the JSON and PNG results (default: ./fastlayers-bench)")


def run(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    if not (folder / "harness.py").is_file():
        raise SystemExit(f"fastlayers bench: error: the benchmark scripts are not installed in {folder} "
                         "(reinstall fastlayers with `pip install --no-build-isolation .`)")
    out = args.out.resolve()
    ops = OPS if args.op == "all" else (args.op,)
    failed = []
    for op in ops:
        command = [sys.executable, str(folder / f"bench_{op}.py"), "--out", str(out), "--device", args.device]
        command += ["--quick"] * args.quick + (["--threads", str(args.threads)] if args.threads else [])
        print(f"$ {' '.join(command)}", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(op)
    written = sorted(p.name for op in ops for p in out.glob(f"{op}.*")) if out.is_dir() else []
    print(f"\nresults in {out}: {', '.join(written) if written else 'none'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
