"""fastlayers.nn.LSTM / RNN against torch.nn.LSTM / RNN (same parameters, same run).

Train step = forward + backward of ``output.sum()`` (input and parameter gradients);
inference = forward under ``torch.no_grad()``. Sizes: the seed's model (B=100, T=20,
I=10, H=50, 2 layers) and B=32, T=64, I=128, H=256, 1 layer (its LSTM train step also on
an input that needs no gradient, as a model's first layer sees data); the LSTM train step at
B=64, T=100, I=256, H=512, 2 layers (not with --quick: about a second per call); at
the seed size also the train steps where torch leaves oneDNN: an LSTM with
proj_size=25, a PackedSequence of uneven lengths (20 down to 1), and float64 (LSTM
and RNN). GFLOP/s counts the GEMM work only,
2 * T * B * G * H * (I_layer + H) per layer forward (G = 4 gates for the LSTM, 1 for the
RNN; nominal, ignoring projection and padding) and three times that for a train step
(less the input gradient's 2 * T * B * G * H * I when the input needs none);
GB/s the input, output and weights read or written once.

    python benchmarks/bench_lstm.py [--quick] [--threads N] [--device cpu|cuda|all]
"""

from __future__ import annotations

import torch

from harness import Case, parse_args, run

import fastlayers.nn as fnn

# (batch, steps, input_size, hidden_size, num_layers)
SIZES = [(100, 20, 10, 50, 2), (32, 64, 128, 256, 1)]
# LSTM train step only (the large size; skipped with --quick).
LARGE_SIZE = (64, 100, 256, 512, 2)


def gemm_flops(kind: str, batch: int, steps: int, input_size: int, hidden: int, layers: int) -> float:
    gates = 4 if kind == "lstm" else 1
    total = 0.0
    for layer in range(layers):
        layer_input = input_size if layer == 0 else hidden
        total += 2.0 * steps * batch * gates * hidden * (layer_input + hidden)
    return total


def make_cases(device: str, quick: bool = False) -> list[Case]:
    cases = []
    for batch, steps, input_size, hidden, layers in SIZES:
        for kind in ("lstm", "rnn"):
            native_cls, ours_cls = (torch.nn.LSTM, fnn.LSTM) if kind == "lstm" else (torch.nn.RNN, fnn.RNN)
            native = native_cls(input_size, hidden, num_layers=layers, device=device)
            ours = ours_cls.from_torch(native)
            x = torch.randn(steps, batch, input_size, device=device)
            x_train = x.clone().requires_grad_()
            weights = sum(p.numel() for p in native.parameters())
            io = steps * batch * (input_size + hidden)
            flops = gemm_flops(kind, batch, steps, input_size, hidden, layers)
            tag = f"{kind} B={batch} T={steps} I={input_size} H={hidden} L={layers} {device}"
            params = {
                "kind": kind,
                "batch": batch,
                "steps": steps,
                "input_size": input_size,
                "hidden_size": hidden,
                "num_layers": layers,
            }

            def train(module, x_train=x_train):
                output, _ = module(x_train)
                output.sum().backward()

            def infer(module, x=x):
                with torch.no_grad():
                    return module(x)

            cases.append(
                Case(
                    f"train {tag}",
                    lambda m=native, f=train: f(m),
                    lambda m=ours, f=train: f(m),
                    3 * flops,
                    3 * 4 * (io + weights),
                    device,
                    {**params, "mode": "train"},
                )
            )
            cases.append(
                Case(
                    f"inference {tag}",
                    lambda m=native, f=infer: f(m),
                    lambda m=ours, f=infer: f(m),
                    flops,
                    4 * (io + weights),
                    device,
                    {**params, "mode": "inference"},
                )
            )
    # The H=256 LSTM train step on data that needs no gradient (a model's first layer):
    # the layer backward then skips the input's gradient GEMM (torch's computes it).
    cases.append(_lstm_train_case(device, SIZES[1], input_grad=False))
    if not quick:
        cases.append(_lstm_train_case(device, LARGE_SIZE))
    cases.extend(_off_onednn_cases(device))
    return cases


def _train_case(name: str, native: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor, flops: float,
                device: str, params: dict) -> Case:
    def train(module):
        output, _ = module(x)
        output.sum().backward()

    return Case(name, lambda: train(native), lambda: train(ours), flops, 0.0, device, {**params, "mode": "train"})


def _lstm_train_case(device: str, size: tuple, input_grad: bool = True) -> Case:
    """The LSTM train step at `size`; without input_grad the input needs no gradient and
    the work counted leaves out the input gradient's GEMM."""
    batch, steps, input_size, hidden, layers = size
    native = torch.nn.LSTM(input_size, hidden, num_layers=layers, device=device)
    ours = fnn.LSTM.from_torch(native)
    x = torch.randn(steps, batch, input_size, device=device, requires_grad=input_grad)
    flops = 3 * gemm_flops("lstm", batch, steps, input_size, hidden, layers)
    if not input_grad:
        flops -= 2.0 * steps * batch * 4 * hidden * input_size
    without = "" if input_grad else "input without grad "
    tag = f"lstm {without}B={batch} T={steps} I={input_size} H={hidden} L={layers} {device}"
    params = {"kind": "lstm", "batch": batch, "steps": steps, "input_size": input_size, "hidden_size": hidden,
              "num_layers": layers}
    if not input_grad:
        params["input_grad"] = False
    return _train_case(f"train {tag}", native, ours, x, flops, device, params)


def _off_onednn_cases(device: str) -> list[Case]:
    """Seed-size train steps: LSTM with a projection, with packed uneven lengths, and
    LSTM and RNN in float64."""
    batch, steps, input_size, hidden, layers = SIZES[0]
    flops = 3 * gemm_flops("lstm", batch, steps, input_size, hidden, layers)
    cases = []
    # Each case's callables bind their own modules (a closure over the loop's variables
    # would time the last-built pair instead).
    native = torch.nn.LSTM(input_size, hidden, num_layers=layers, proj_size=hidden // 2, device=device)
    ours = fnn.LSTM.from_torch(native)
    x = torch.randn(steps, batch, input_size, device=device, requires_grad=True)
    tag = f"lstm proj_size={hidden // 2} B={batch} T={steps} I={input_size} H={hidden} L={layers} {device}"
    params = {"kind": "lstm", "proj_size": hidden // 2, "batch": batch, "steps": steps}
    cases.append(_train_case(f"train {tag}", native, ours, x, flops, device, params))

    native = torch.nn.LSTM(input_size, hidden, num_layers=layers, device=device)
    ours = fnn.LSTM.from_torch(native)
    lengths = torch.linspace(steps, 1, batch).round().long()
    # The work a packed batch needs: its sequences' steps, not the padded steps x batch.
    packed_flops = flops * int(lengths.sum()) / (steps * batch)
    padded = torch.randn(steps, batch, input_size, device=device, requires_grad=True)

    def train_packed(module, padded=padded, lengths=lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths)
        output, _ = module(packed)
        output.data.sum().backward()

    tag = f"lstm packed lengths {steps}..1 B={batch} I={input_size} H={hidden} L={layers} {device}"
    params = {"kind": "lstm", "packed": True, "batch": batch, "steps": steps, "mode": "train"}
    cases.append(
        Case(
            f"train {tag}",
            lambda m=native: train_packed(m),
            lambda m=ours: train_packed(m),
            packed_flops,
            0.0,
            device,
            params,
        )
    )

    for kind in ("lstm", "rnn"):
        native_cls, ours_cls = (torch.nn.LSTM, fnn.LSTM) if kind == "lstm" else (torch.nn.RNN, fnn.RNN)
        native = native_cls(input_size, hidden, num_layers=layers, device=device, dtype=torch.float64)
        ours = ours_cls.from_torch(native)
        x = torch.randn(steps, batch, input_size, device=device, dtype=torch.float64, requires_grad=True)
        flops = 3 * gemm_flops(kind, batch, steps, input_size, hidden, layers)
        tag = f"{kind} float64 B={batch} T={steps} I={input_size} H={hidden} L={layers} {device}"
        params = {"kind": kind, "dtype": "float64", "batch": batch, "steps": steps}
        cases.append(_train_case(f"train {tag}", native, ours, x, flops, device, params))
    return cases


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    cases = [c for d in devices for c in make_cases(d, quick=args.quick)]
    run("lstm", cases, args)


if __name__ == "__main__":
    main()
