"""``fastlayers check``: a self-test for users, in seconds.

Every op, through its public function or module, on every device with kernels, in
float32 and float64: the output and the gradients of the inputs and parameters from
the compiled kernels must match the op's pure-PyTorch reference
(``fastlayers.use_backend("reference")``) within the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import fastlayers
import fastlayers.nn as fnn
from fastlayers import _extension
from fastlayers.functional import bias_act, scaled_dot_product_attention

# (rtol, atol) for kernels vs reference: both compute in the same dtype with different
# summation orders.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}


@dataclass
class Case:
    op: str
    detail: str
    run: Callable[[], object]  # output tensor or tuple of tensors
    inputs: list[torch.Tensor]  # tensors (inputs and parameters) whose gradients are compared


def _module_case(op: str, detail: str, module: torch.nn.Module, *args: torch.Tensor) -> Case:
    return Case(op, detail, lambda: module(*args), [*args, *module.parameters()])


def cases(device: torch.device, dtype: torch.dtype) -> Iterator[Case]:
    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    kw = {"device": device, "dtype": dtype}
    x, b = t(4, 16, 9, 9), t(16)
    for activation in ("relu", "gelu", "silu", "tanh", "sigmoid"):
        yield Case("bias_act", activation, lambda a=activation: bias_act(x, b, a), [x, b])

    img = t(3, 5, 12, 12)
    yield _module_case("conv2d", "3x3 pad 1", fnn.Conv2d(5, 8, 3, padding=1, **kw), img)
    yield _module_case("conv2d", "3x3 stride 2 dilation 2", fnn.Conv2d(5, 8, 3, stride=2, dilation=2, **kw), img)
    yield _module_case("conv2d", "depthwise 3x3", fnn.Conv2d(5, 5, 3, padding=1, groups=5, **kw), img)
    yield _module_case("conv2d + relu", "3x3 pad 1", fnn.Conv2dReLU(5, 8, 3, padding=1, **kw), img)
    yield _module_case("conv2d + relu + max_pool2d", "3x3 pad 1, pool 2", fnn.Conv2dReLUMaxPool2d(5, 8, 3, padding=1, **kw), img)
    yield _module_case("conv1d", "k5 pad 2", fnn.Conv1d(5, 8, 5, padding=2, **kw), t(3, 5, 20))

    seq = t(3, 7, 6)
    yield _module_case("lstm cell", "input 6, hidden 10", fnn.LSTMCell(6, 10, **kw), t(3, 6))
    yield _module_case("rnn cell", "tanh", fnn.RNNCell(6, 10, **kw), t(3, 6))
    yield _module_case("rnn cell", "relu", fnn.RNNCell(6, 10, nonlinearity="relu", **kw), t(3, 6))
    yield _module_case("lstm layer", "2 layers, batch_first", fnn.LSTM(6, 10, num_layers=2, batch_first=True, **kw), seq)
    yield _module_case("lstm layer", "bidirectional", fnn.LSTM(6, 10, bidirectional=True, batch_first=True, **kw), seq)
    yield _module_case("rnn layer", "tanh, 2 layers", fnn.RNN(6, 10, num_layers=2, batch_first=True, **kw), seq)

    q, k, v = t(2, 3, 17, 16), t(2, 3, 23, 16), t(2, 3, 23, 16)
    yield Case("attention", "sdpa", lambda: scaled_dot_product_attention(q, k, v), [q, k, v])
    yield Case("attention", "sdpa causal", lambda: scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])
    mask = torch.rand(17, 23, device=device) > 0.3
    yield Case("attention", "sdpa bool mask", lambda: scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v])
    mha, tokens = fnn.MultiheadAttention(16, 4, batch_first=True, **kw), t(2, 9, 16)
    yield Case("attention", "MultiheadAttention", lambda: mha(tokens, tokens, tokens, need_weights=False)[0],
               [tokens, *mha.parameters()])
    luong, states = fnn.LuongAttention(10, score="general", **kw), t(3, 7, 10)
    yield _module_case("attention", "LuongAttention general", luong, states)


def _outputs(result) -> list[torch.Tensor]:
    items = result if isinstance(result, (tuple, list)) else [result]
    flat: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, (tuple, list)):
            flat.extend(_outputs(item))
        elif isinstance(item, torch.Tensor) and item.is_floating_point():
            flat.append(item)
    return flat


def _forward_backward(case: Case, backend: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with fastlayers.use_backend(backend):
        outputs = _outputs(case.run())
        # A fixed random cotangent per output, so every output element reaches the gradients.
        g = torch.Generator(device=outputs[0].device).manual_seed(0)
        loss = sum((o * torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype)).sum() for o in outputs)
        grads = torch.autograd.grad(loss, case.inputs, allow_unused=True)
    return [o.detach() for o in outputs], [g for g in grads if g is not None]


def _max_error(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float, atol: float) -> tuple[float, bool]:
    """Largest |actual - expected| and whether every element is within atol + rtol * |expected|."""
    worst, ok = 0.0, len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return float("inf"), False
        diff = (a - e).abs()
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
        ok = ok and bool((diff <= atol + rtol * e.abs()).all())
    return worst, ok


def check_devices() -> tuple[list[torch.device], list[str]]:
    """Devices with kernels to check, and notes on devices that cannot be checked."""
    notes = []
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        if _extension.has_kernels("cuda"):
            devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        else:
            notes.append("CUDA devices are visible but fastlayers was built without CUDA kernels: not checked")
    return devices, notes


def run_checks(devices: list[torch.device]) -> list[dict]:
    rows = []
    for device in devices:
        for dtype, (rtol, atol) in TOLERANCES.items():
            torch.manual_seed(0)
            for case in cases(device, dtype):
                row = {"op": case.op, "case": case.detail, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
                try:
                    ours = _forward_backward(case, "kernels")
                    reference = _forward_backward(case, "reference")
                    row["forward_err"], forward_ok = _max_error(ours[0], reference[0], rtol, atol)
                    row["backward_err"], backward_ok = _max_error(ours[1], reference[1], rtol, atol)
                    row["passed"] = forward_ok and backward_ok
                except Exception as exc:  # an op raising is a failure to report, not a crash
                    row.update(forward_err=None, backward_err=None, passed=False, error=f"{type(exc).__name__}: {exc}")
                rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from fastlayers.cli import console as make_console
    from rich.table import Table

    console = make_console()
    if not _extension.available():
        console.print(f"FAIL: the compiled extension is not loaded ({_extension.load_error}); every op would run "
                      "its reference. Rebuild with `pip install --no-build-isolation .`")
        return 1
    start = time.perf_counter()
    devices, notes = check_devices()
    rows = run_checks(devices)
    table = Table(title="fastlayers kernels vs pure-PyTorch reference (forward output, gradients of inputs and parameters)")
    for column in ("op", "case", "device", "dtype", "forward max err", "backward max err", "result"):
        table.add_column(column, justify="right" if "err" in column else "left")
    for r in rows:
        fmt = lambda e: "-" if e is None else f"{e:.1e}"  # noqa: E731
        result = "[green]pass[/]" if r["passed"] else f"[red]FAIL[/] {r.get('error', 'outside tolerance')}"
        table.add_row(r["op"], r["case"], r["device"], r["dtype"], fmt(r["forward_err"]), fmt(r["backward_err"]), result)
    console.print(table)
    for note in notes:
        console.print(note)
    failed = sum(not r["passed"] for r in rows)
    tolerances = ", ".join(f"{str(d).replace('torch.', '')} rtol {r:g} atol {a:g}" for d, (r, a) in TOLERANCES.items())
    console.print(f"{len(rows) - failed}/{len(rows)} passed in {time.perf_counter() - start:.1f} s "
                  f"on {', '.join(map(str, devices))} (tolerances: {tolerances})")
    return 1 if failed else 0
