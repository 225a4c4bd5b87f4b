"""2-D convolution against native PyTorch (oneDNN on the CPU, cuDNN on CUDA).

Cases: 3x3 convolutions (padding 1, NCHW, float32; one of stride 2), a 1x1 one (no
padding), a 7x7 stride-2 RGB stem (padding 3) and a 3-channel output layer forward and
forward+backward (grads of input, weight and bias), and the seed CNN's convolution blocks (batch 64,
3x32x32: conv 3->32 + ReLU + max-pool 2, conv 32->64 + ReLU + max-pool 2), native
torch.nn layers against fastlayers.nn.Conv2dReLUMaxPool2d. GFLOP/s counts the
convolutions' multiply-adds (2 flops each): forward 1x, forward+backward 3x (the
first block's input needs no gradient: 2x for it). These are the direct convolution's
multiply-adds: the 3x3 layers' forward, grad-input and grad-weight run Winograd on the
CPU, 16 multiply-adds where the direct convolution has 36, so their "GFLOP/s" and
"% peak" are effective rates and can exceed the FMA peak.

    python benchmarks/bench_conv.py [--quick] [--threads N] [--device cpu|cuda|all]
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from harness import Case, parse_args, run

import fastlayers
from fastlayers.functional import conv2d

SHAPES = [  # (batch, in_channels, out_channels, input size, kernel, stride); padding kernel // 2
    (32, 64, 128, 32, 3, 1),
    (64, 32, 64, 16, 3, 1),
    (8, 128, 128, 56, 3, 1),
    (32, 64, 128, 32, 3, 2),
    (32, 64, 128, 32, 1, 1),
    (8, 3, 64, 112, 7, 2),
    (16, 64, 3, 64, 3, 1),
]


def conv_flops(batch, cin, cout, out_size, k=3):
    return 2 * batch * cout * cin * k * k * out_size * out_size


def conv_cases(device: str) -> list[Case]:
    cases = []
    for batch, cin, cout, size, k, stride in SHAPES:
        pad = k // 2
        out_size = (size + 2 * pad - k) // stride + 1
        x = torch.randn(batch, cin, size, size, device=device)
        w = torch.randn(cout, cin, k, k, device=device) * (cin * k * k) ** -0.5
        b = torch.randn(cout, device=device)
        g = torch.randn(batch, cout, out_size, out_size, device=device)
        flops = conv_flops(batch, cin, cout, out_size, k)
        nbytes = 4 * (x.numel() + w.numel() + g.numel())
        strided = f" stride {stride}" if stride > 1 else ""
        tag = f"{k}x{k}{strided} B={batch} C={cin}->{cout} {size}x{size} {device}"
        params = {"batch": batch, "in_channels": cin, "out_channels": cout, "size": size, "kernel": k,
                  "stride": stride}

        def native_fwd(x=x, w=w, b=b, pad=pad, stride=stride):
            return F.conv2d(x, w, b, stride=stride, padding=pad)

        def ours_fwd(x=x, w=w, b=b, pad=pad, stride=stride):
            return conv2d(x, w, b, stride=stride, padding=pad)

        xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))

        def native_train(xr=xr, wr=wr, br=br, g=g, pad=pad, stride=stride):
            return torch.autograd.grad(F.conv2d(xr, wr, br, stride=stride, padding=pad), (xr, wr, br), g)

        def ours_train(xr=xr, wr=wr, br=br, g=g, pad=pad, stride=stride):
            return torch.autograd.grad(conv2d(xr, wr, br, stride=stride, padding=pad), (xr, wr, br), g)

        cases.append(Case(f"forward {tag}", native_fwd, ours_fwd, flops, nbytes, device, params))
        cases.append(Case(f"fwd+bwd {tag}", native_train, ours_train, 3 * flops, 3 * nbytes, device, params))
    return cases


def seed_cnn_cases(device: str) -> list[Case]:
    torch.manual_seed(0)
    native = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    ).to(device)
    ours = nn.Sequential(
        fastlayers.nn.Conv2dReLUMaxPool2d.from_torch(native[0]),
        fastlayers.nn.Conv2dReLUMaxPool2d.from_torch(native[3]),
    )
    x = torch.randn(64, 3, 32, 32, device=device)
    g = torch.randn(64, 64, 8, 8, device=device)
    flops1, flops2 = conv_flops(64, 3, 32, 32), conv_flops(64, 32, 64, 16)
    params = {"model": "seed CNN conv blocks", "batch": 64}

    def fwd(model):
        def call():
            with torch.no_grad():
                return model(x)
        return call

    def train(model):
        weights = list(model.parameters())
        return lambda: torch.autograd.grad(model(x), weights, g)

    nbytes = 4 * (x.numel() + 64 * 32 * 16 * 16 + g.numel())
    tag = f"seed CNN conv blocks B=64 3x32x32 {device}"
    return [
        Case(f"forward {tag}", fwd(native), fwd(ours), flops1 + flops2, nbytes, device, params),
        Case(f"fwd+bwd {tag}", train(native), train(ours), 2 * flops1 + 3 * flops2, 3 * nbytes, device, params),
    ]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    cases = [c for d in devices for c in conv_cases(d) + seed_cnn_cases(d)]
    run("conv", cases, args, metric="gflops")


if __name__ == "__main__":
    main()
