"""Flash attention against torch's SDPA and against the unfused math path, same run.

Providers: ``fastlayers.functional.scaled_dot_product_attention`` (ours) against
``torch.nn.functional.scaled_dot_product_attention`` (torch picks its own backend: on
the CPU its fused flash kernel) and against the unfused math path
``softmax(Q K^T * scale + mask) V`` (three ATen ops, an Lq x Lk matrix in memory). Each
configuration gives one case per comparison, so "ours" is timed in both.

FLOPs are nominal: 4*B*H*Lq*Lk*E forward (two GEMMs), x3.5 for forward+backward,
halved when causal; %peak is against the fp32 FMA peak measured in the same run.

    python benchmarks/bench_attention.py [--quick] [--threads N] [--device cpu|cuda|all]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness import Case, parse_args, run

from fastlayers.functional import scaled_dot_product_attention

# (B, H, L, E) from the issue: one long sequence and a batch of shorter ones.
SHAPES = [(1, 8, 2048, 64), (4, 8, 512, 64)]


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


if __name__ == "__main__":
    main()
