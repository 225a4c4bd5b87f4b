"""Fused bias + activation against native PyTorch (``act(x + b.view(1, C, 1, 1))``).

The op is memory-bound: native reads x, writes x + b, reads it back and writes y
(4 passes); the fused kernel reads x and writes y (2 passes). GB/s counts the minimal
traffic (2 passes forward; forward+backward: x, y forward then grad_out, saved, grad_in)
for both, so it compares directly with the copy bandwidth. GFLOP/s uses nominal counts
(add + activation: relu 1, sigmoid/tanh/silu ~4, gelu ~8) and is small by nature.

    python benchmarks/bench_bias_act.py [--quick] [--threads N] [--device cpu|cuda|all]
"""

from __future__ import annotations

import torch

from harness import Case, parse_args, run

from fastlayers.ops.bias_act import bias_act

NATIVE = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
}
NOMINAL_FLOPS = {"relu": 2, "sigmoid": 5, "silu": 6, "gelu": 9}


def make_cases(device: str, quick: bool) -> list[Case]:
    shape = (32, 64, 32, 32) if quick else (64, 64, 32, 32)  # a conv layer's output
    configs = [
        ("relu", torch.float32, torch.contiguous_format),
        ("relu", torch.float32, torch.channels_last),
        ("gelu", torch.float32, torch.contiguous_format),
        ("silu", torch.float32, torch.contiguous_format),
        ("relu", torch.bfloat16, torch.contiguous_format),
    ]
    cases = []
    for activation, dtype, fmt in configs:
        x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        b = torch.randn(shape[1], dtype=dtype, device=device)
        g = torch.randn_like(x)
        act = NATIVE[activation]
        n = x.numel()
        elt = x.element_size()
        layout = "cl" if fmt == torch.channels_last else "nchw"
        tag = f"{activation} {str(dtype).replace('torch.', '')} {layout} {device}"

        def native_fwd(x=x, b=b, act=act):
            return act(x + b.view(1, -1, 1, 1))

        def ours_fwd(x=x, b=b, activation=activation):
            return bias_act(x, b, activation)

        xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()

        def native_train(xr=xr, br=br, g=g, act=act):
            return torch.autograd.grad(act(xr + br.view(1, -1, 1, 1)), (xr, br), g)

        def ours_train(xr=xr, br=br, g=g, activation=activation):
            return torch.autograd.grad(bias_act(xr, br, activation), (xr, br), g)

        params = {"shape": list(shape), "dtype": str(dtype), "layout": layout, "activation": activation}
        flops = NOMINAL_FLOPS[activation] * n
        cases.append(Case(f"forward {tag}", native_fwd, ours_fwd, flops, 2 * n * elt, device, params))
        cases.append(Case(f"fwd+bwd {tag}", native_train, ours_train, 3 * flops, 5 * n * elt, device, params))
    return cases


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    cases = [c for d in devices for c in make_cases(d, args.quick)]
    run("bias_act", cases, args, metric="gbps")


if __name__ == "__main__":
    main()
