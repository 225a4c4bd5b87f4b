"""Flash attention against torch's SDPA and against the unfused math path, same run.

Providers: ``fastlayers.functional.scaled_dot_product_attention`` (ours) against
``torch.nn.functional.scaled_dot_product_attention`` (torch picks its own backend: on
the CPU its fused flash kernel) and against the unfused math path
``softmax(Q K^T * scale + mask) V`` (three ATen ops, an Lq x Lk matrix in memory). Each
configuration gives one case per comparison, so "ours" is timed in both.

FLOPs are nominal: 4*B*H*Lq*Lk*E forward (two GEMMs), x3.5 for forward+backward,
halved when causal; %peak is against the fp32 FMA peak measured in the same run.

Peak extra memory (CPU): each provider runs forward, and forward+backward, once at
MEMORY_SHAPE in a fresh process; the figure is the process's peak resident memory
during the call minus its resident memory just before it (Linux: VmHWM after
resetting it through /proc/self/clear_refs, minus VmRSS), so inputs, imports and
lazy initialisation are not counted, while outputs and gradients (the same for every
provider) are. It goes into the JSON run record under "memory".

    python benchmarks/bench_attention.py [--quick] [--threads N] [--device cpu|cuda|all]
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import Case, parse_args, run

from fastlayers.functional import scaled_dot_product_attention

# (B, H, L, E) from the issue: one long sequence and a batch of shorter ones.
SHAPES = [(1, 8, 2048, 64), (4, 8, 512, 64)]
# The L = 8192 with one head: the math path's score matrix alone is L*L*4 B =
# 256 MiB per head (x8 heads would need several GiB on a machine shared by others).
MEMORY_SHAPE = (1, 1, 8192, 64)


def unfused(q, k, v, causal_mask):
    s = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal_mask is not None:
        s = s.masked_fill(causal_mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def config_cases(B: int, H: int, L: int, E: int, causal: bool, device: str) -> list[Case]:
    q, k, v = (torch.randn(B, H, L, E, device=device) for _ in range(3))
    grad = torch.randn(B, H, L, E, device=device)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    mask = torch.ones(L, L, dtype=torch.bool, device=device).triu(1) if causal else None

    def ours(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=causal)

    natives = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "math": lambda q, k, v: unfused(q, k, v, mask),
    }

    def forward(fn):
        return lambda: fn(q, k, v)

    def train(fn):
        return lambda: torch.autograd.grad(fn(qr, kr, vr), (qr, kr, vr), grad)

    fwd_flops = 4 * B * H * L * L * E / (2 if causal else 1)
    io_bytes = 4 * B * H * L * E * 4  # q, k, v, output
    tag = f"B{B} H{H} L{L} E{E}{' causal' if causal else ''}"
    params = {"B": B, "H": H, "L": L, "E": E, "causal": causal, "dtype": "float32"}
    cases = []
    for name, native in natives.items():
        p = params | {"native": name}
        cases.append(Case(f"fwd {tag} vs {name}", forward(native), forward(ours), fwd_flops, io_bytes, device,
                          p | {"pass": "forward"}))
        cases.append(Case(f"fwd+bwd {tag} vs {name}", train(native), train(ours), 3.5 * fwd_flops, 2 * io_bytes,
                          device, p | {"pass": "forward+backward"}))
    return cases


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_extra_memory_probe(provider: str, backward: bool, shape: tuple, threads: int) -> int:
    """Bytes of resident memory one call adds at its peak (run in a fresh process)."""
    torch.set_num_threads(threads)
    fns = {
        "fastlayers": lambda q, k, v: scaled_dot_product_attention(q, k, v),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "math": lambda q, k, v: unfused(q, k, v, None),
    }
    fn = fns[provider]

    def call(B, H, L, E):
        q, k, v = (torch.randn(B, H, L, E, requires_grad=backward) for _ in range(3))
        grad = torch.randn(B, H, L, E)
        return q, k, v, grad

    def run(q, k, v, grad):
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad) if backward else out

    run(*call(1, 1, 64, shape[3]))  # lazy initialisation (kernel tables, thread pool) is not counted
    inputs = call(*shape)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _memory_kib("VmRSS")
    result = run(*inputs)
    peak = _memory_kib("VmHWM")
    del result
    return (peak - before) * 1024


def measure_peak_extra_memory(threads: int) -> list[dict]:
    """Peak extra memory of each provider at MEMORY_SHAPE, forward and forward+backward."""
    B, H, L, E = MEMORY_SHAPE
    rows = []
    for backward in (False, True):
        row = {"params": {"B": B, "H": H, "L": L, "E": E, "dtype": "float32"},
               "pass": "forward+backward" if backward else "forward"}
        for provider in ("fastlayers", "sdpa", "math"):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                row[f"{provider}_bytes"] = pool.submit(
                    _peak_extra_memory_probe, provider, backward, MEMORY_SHAPE, threads
                ).result()
        row["fastlayers_over_math"] = row["fastlayers_bytes"] / row["math_bytes"]
        rows.append(row)
    return rows


def print_memory_table(rows: list[dict]) -> None:
    B, H, L, E = MEMORY_SHAPE
    print(f"\npeak extra memory, B={B} H={H} L={L} E={E} float32 (fresh process per provider, "
          "peak RSS during the call minus RSS before it):")
    print(f"{'pass':<18} {'fastlayers MiB':>15} {'sdpa MiB':>10} {'math MiB':>10} {'ours/math':>10}")
    for r in rows:
        mib = {p: r[f"{p}_bytes"] / 2**20 for p in ("fastlayers", "sdpa", "math")}
        print(f"{r['pass']:<18} {mib['fastlayers']:>15.1f} {mib['sdpa']:>10.1f} {mib['math']:>10.1f} "
              f"{r['fastlayers_over_math']:>10.3f}")


def make_cases(device: str, quick: bool) -> list[Case]:
    shapes = SHAPES[:1] if quick else SHAPES
    return [c for B, H, L, E in shapes for causal in (False, True) for c in config_cases(B, H, L, E, causal, device)]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    cases = [c for d in devices for c in make_cases(d, args.quick)]
    run("attention", cases, args, metric="gflops")
    if "cpu" in devices:
        memory = measure_peak_extra_memory(args.threads)
        print_memory_table(memory)
        path = args.out / "attention.json"
        runs = json.loads(path.read_text())
        runs[-1]["memory"] = memory  # the record run() just appended
        path.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
