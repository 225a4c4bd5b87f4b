"""Shared benchmark harness: fastlayers against native PyTorch, same process, interleaved.

Each case gives a `native` and an `ours` callable doing the same work, its nominal
FLOPs and the bytes it must move at least. Rounds alternate the two (and their order)
so that clock drift and thermal state hit both alike; each round times one provider
with ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronizes CUDA), and
the reported time is the median over rounds with the 20th-80th percentile spread.

Denominators are measured in the same run, after the cases: the fp32 FMA peak with the project's own
C++ FMA loop (fastlayers._C.measure_fma_peak_gflops) at the benchmark's thread count,
and the memory bandwidth of a large tensor copy. Results print as a table and go to
``benchmarks/results/<name>.json`` (runs appended, with machine and versions) and a PNG.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

import fastlayers
from fastlayers import _extension

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# glibc returns freed memory at the top of the heap to the OS (and serves large blocks
# with mmap), so a loop that allocates and frees 10 MB tensors can page-fault every
# megabyte of them again on each call: 2-6x slower, and bimodal from run to run,
# depending on the order of frees. Fixed thresholds stop that, as jemalloc/tcmalloc
# (which PyTorch's performance guide recommends) would; both providers benefit alike.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def configure_malloc() -> str:
    """Raise glibc's trim and mmap thresholds to 1 GiB; returns a note for the report."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        return "glibc malloc: trim/mmap thresholds 1 GiB" if ok else "glibc malloc: defaults (mallopt failed)"
    except OSError:
        return "malloc: platform default"


MALLOC_NOTE = configure_malloc()  # before any benchmark tensor is allocated


@dataclass
class Case:
    name: str
    native: Callable[[], object]
    ours: Callable[[], object]
    flops: float  # nominal floating-point operations per call
    bytes: float  # bytes a call must read and write at least
    device: str = "cpu"
    params: dict = field(default_factory=dict)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter timings")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return parser.parse_args()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = (len(ordered) - 1) * q
    lo, hi = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (index - lo)


def measure_copy_bandwidth(threads: int, device: str = "cpu") -> float:
    """GB/s of a 256 MiB tensor copy (read + write counted)."""
    n = 64 * 1024 * 1024
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    timer = tbench.Timer("dst.copy_(src)", globals={"dst": dst, "src": src}, num_threads=threads)
    seconds = timer.blocked_autorange(min_run_time=0.5).median
    return 2 * n * 4 / seconds / 1e9


def machine_info(threads: int, devices: list[str]) -> dict:
    info = fastlayers.info()
    data = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": info["cpu"],
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastlayers": fastlayers.__version__,
        "cpu_isa": info["cpu_isa_active"],
        "backend": "kernels" if _extension.available() else "reference (extension not built)",
    }
    if "cpu" in devices:
        data["fma_peak_gflops"] = (
            _extension._C.measure_fma_peak_gflops(threads, 0.5) if _extension.available() else None
        )
        data["copy_gbps"] = measure_copy_bandwidth(threads)
    if "cuda" in devices:
        data["gpu"] = torch.cuda.get_device_name()
        data["gpu_copy_gbps"] = measure_copy_bandwidth(threads, "cuda")
    return data


def time_case(case: Case, threads: int, rounds: int, min_run_time: float) -> dict:
    providers = {"native": case.native, "ours": case.ours}
    samples: dict[str, list[float]] = {"native": [], "ours": []}
    for fn in providers.values():  # warm-up: caches, allocator, lazy init
        fn()
    for r in range(rounds):
        order = ["native", "ours"] if r % 2 == 0 else ["ours", "native"]
        for provider in order:
            timer = tbench.Timer("fn()", globals={"fn": providers[provider]}, num_threads=threads)
            samples[provider].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    result = {"name": case.name, "device": case.device, "params": case.params}
    for provider, times in samples.items():
        median = statistics.median(times)
        result[provider] = {
            "median_ms": median * 1e3,
            "p20_ms": _percentile(times, 0.2) * 1e3,
            "p80_ms": _percentile(times, 0.8) * 1e3,
            "gflops": case.flops / median / 1e9,
            "gbps": case.bytes / median / 1e9,
        }
    result["speedup"] = result["native"]["median_ms"] / result["ours"]["median_ms"]
    return result


def run(name: str, cases: list[Case], args: argparse.Namespace, metric: str = "gflops") -> list[dict]:
    """Times every case, prints the table, appends the JSON, draws the PNG. `metric`
    ("gflops" or "gbps") is the throughput the plot shows beside the speedup."""
    torch.set_num_threads(args.threads)
    devices = sorted({c.device for c in cases})
    rounds, min_run_time = (3, 0.05) if args.quick else (7, 0.2)
    results = [time_case(case, args.threads, rounds, min_run_time) for case in cases]
    # The denominators are measured after the cases, not before: right after the FMA
    # loop's own threads, torch's thread pool ran as if on one core for seconds (the
    # seed-size LSTM train step took 2.8 ms instead of 1.8 for ours, 3.4 instead of 2.2
    # for torch's; a 3 s pause also avoided it), which also made earlier runs' native
    # seed-size times swing between 2.1 and 4.1 ms.
    machine = machine_info(args.threads, devices)
    machine["malloc"] = MALLOC_NOTE
    for r in results:
        peak = machine.get("fma_peak_gflops") if r["device"] == "cpu" else None
        bandwidth = machine.get("copy_gbps") if r["device"] == "cpu" else machine.get("gpu_copy_gbps")
        for provider in ("native", "ours"):
            r[provider]["pct_fma_peak"] = 100 * r[provider]["gflops"] / peak if peak else None
            r[provider]["pct_copy_bandwidth"] = 100 * r[provider]["gbps"] / bandwidth if bandwidth else None
    print_table(name, machine, results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({"machine": machine, "results": results})
    path.write_text(json.dumps(runs, indent=1))
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(name, machine, results, args.out, metric)}")
    return results


def print_table(name: str, machine: dict, results: list[dict]) -> None:
    peak = machine.get("fma_peak_gflops")
    print(
        f"\n{name}: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"fastlayers {machine['fastlayers']} ({machine['backend']}, CPU ISA {machine['cpu_isa']})"
    )
    if peak:
        print(f"measured fp32 FMA peak {peak:.0f} GFLOP/s, copy bandwidth {machine['copy_gbps']:.1f} GB/s")
    print(machine["malloc"])
    header = (
        f"{'case':<44} {'native ms':>10} {'ours ms':>10} {'(p20-p80)':>15} {'speedup':>8} "
        f"{'GFLOP/s':>8} {'%peak':>6} {'GB/s':>7} {'%copy':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ours, native = r["ours"], r["native"]
        pct = f"{ours['pct_fma_peak']:.1f}" if ours["pct_fma_peak"] is not None else "-"
        pct_bw = f"{ours['pct_copy_bandwidth']:.0f}" if ours["pct_copy_bandwidth"] is not None else "-"
        spread = f"{ours['p20_ms']:.3f}-{ours['p80_ms']:.3f}"
        print(
            f"{r['name']:<44} {native['median_ms']:>10.3f} {ours['median_ms']:>10.3f} {spread:>15} "
            f"{r['speedup']:>7.2f}x {ours['gflops']:>8.1f} {pct:>6} {ours['gbps']:>7.1f} {pct_bw:>6}"
        )


def plot(name: str, machine: dict, results: list[dict], out: Path, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["name"] for r in results]
    fig, (ax_speed, ax_bw) = plt.subplots(1, 2, figsize=(14, 0.45 * len(labels) + 2), sharey=True)
    ys = range(len(labels))
    ax_speed.barh(ys, [r["speedup"] for r in results], color="tab:blue")
    ax_speed.axvline(1.0, color="black", linewidth=0.8)
    ax_speed.set_yticks(list(ys), labels)
    ax_speed.set_xlabel("speedup over native PyTorch (median)")
    ax_speed.invert_yaxis()
    width = 0.4
    ax_bw.barh([y - width / 2 for y in ys], [r["native"][metric] for r in results], width, label="native")
    ax_bw.barh([y + width / 2 for y in ys], [r["ours"][metric] for r in results], width, label="fastlayers")
    ceiling, ceiling_label, xlabel = (
        (machine.get("copy_gbps"), "tensor copy", "effective GB/s (minimal traffic)")
        if metric == "gbps"
        else (machine.get("fma_peak_gflops"), "fp32 FMA peak", "GFLOP/s")
    )
    if ceiling:
        ax_bw.axvline(ceiling, color="gray", linestyle="--", label=ceiling_label)
    ax_bw.set_xlabel(xlabel)
    ax_bw.legend(loc="lower right")
    fig.suptitle(f"{name}: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}")
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
