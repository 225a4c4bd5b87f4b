"""fastlayers.functional.bias_act: y = act(x + b), b along dimension 1."""

from __future__ import annotations

import decimal
import math

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers.ops.bias_act import (
    ACTIVATIONS,
    bias_act,
    bias_act_backward_reference,
    bias_act_reference,
)
from helpers import (
    CPU_DTYPES,
    CUDA_DTYPES,
    assert_close_to_oracle,
    assert_no_worse_than_torch,
    devices,
    make_layout,
    requires_cuda_kernels,
    requires_extension,
)

pytestmark = requires_extension

NATIVE = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

# (shape, layout): conv outputs NCHW and channels_last, linear (N, C), sequences
# (N, C, L), 5-D, batch 1, single elements, odd sizes, non-dense and expanded views.
CASES = [
    ((2, 3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((4, 16), "contiguous"),
    ((3, 5, 17), "contiguous"),
    ((1, 1, 1, 1), "contiguous"),
    ((2, 4, 3, 3, 3), "channels_last_3d"),
    ((3, 6, 4, 9), "strided"),
    ((3, 6, 4, 4), "expanded"),
    ((1, 37, 11, 13), "channels_last"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{layout}" for s, layout in CASES]


def _inputs(shape, layout, dtype, device, with_bias, scale=2.0):
    x = make_layout((scale * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype), layout)
    bias = torch.randn(shape[1], dtype=torch.float64, device=device).to(dtype) if with_bias else None
    return x, bias


def _oracle_forward(x, bias, activation):
    return bias_act_reference(x.double(), None if bias is None else bias.double(), activation)


# ---- forward ----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_float64_oracle_and_native_torch(shape, layout, dtype, activation, with_bias):
    x, bias = _inputs(shape, layout, dtype, "cpu", with_bias)
    y = bias_act(x, bias, activation)
    oracle = _oracle_forward(x, bias, activation)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_to_oracle(y, oracle, dtype)
    native = NATIVE[activation](x if bias is None else x + bias.view([1, -1] + [1] * (x.dim() - 2)))
    assert_no_worse_than_torch(y, native, oracle)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,layout", CASES[:2] + CASES[5:6], ids=CASE_IDS[:2] + CASE_IDS[5:6])
def test_output_keeps_the_memory_format_torch_gives(shape, layout, activation):
    x, bias = _inputs(shape, layout, torch.float32, "cpu", True)
    y = bias_act(x, bias, activation)
    native = x + bias.view([1, -1] + [1] * (x.dim() - 2))
    assert y.stride() == native.stride()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_every_cpu_isa_computes_the_same_result(cpu_isa, activation, dtype):
    x, bias = _inputs((3, 19, 7, 5), "contiguous", dtype, "cpu", True)
    xl = x.contiguous(memory_format=torch.channels_last)
    oracle = _oracle_forward(x, bias, activation)
    assert_close_to_oracle(bias_act(x, bias, activation), oracle, dtype, msg=cpu_isa)
    assert_close_to_oracle(bias_act(xl, bias, activation), oracle, dtype, msg=cpu_isa)
    g = torch.randn_like(x)
    grads = torch.autograd.grad(bias_act(x.requires_grad_(), bias.requires_grad_(), activation), (x, bias), g)
    ref_grads = torch.autograd.grad(_oracle_forward(x, bias, activation), (x, bias), g)
    for got, want in zip(grads, ref_grads):
        assert_close_to_oracle(got, want, dtype if dtype != torch.float16 else torch.bfloat16, msg=cpu_isa)


# Every float32 from -110 to 110 at a spacing that hits the polynomial breakpoints,
# plus the special values.
_SPECIALS = [0.0, -0.0, 1e-30, -1e-30, 1e-42, 88.7, 88.72, 88.73, 89.0, -87.3, -88.0, -103.0, -104.0, -110.0,
             0.625, -0.625, 0.6249999, 9.0, -9.0, 1e30, -1e30, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "sigmoid"])
def test_float32_math_is_accurate_over_the_whole_range(cpu_isa, activation):
    x = torch.cat([torch.linspace(-110, 110, 400_001), torch.tensor(_SPECIALS)]).float()
    y = bias_act(x, None, activation)
    exact = bias_act_reference(x.double(), None, activation)  # float64, erfc-based gelu
    finite = torch.isfinite(exact)
    # NaN and infinities exactly where the float64 function has them.
    assert torch.equal(torch.isnan(y), torch.isnan(exact))
    assert torch.equal(y[~finite & ~torch.isnan(exact)].double(), exact[~finite & ~torch.isnan(exact)])
    err = (y.double() - exact)[finite].abs()
    # Relative error, except below 1e-35 where float32 itself goes subnormal.
    rel = 2e-5 if activation == "gelu" else 4e-7  # erfc's error grows with x^2 in the far tail
    bound = rel * exact[finite].abs() + 1e-35
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"worst error is {worst:.2f}x the bound"
    # Signed zeros: act(-0.0) is -0.0 wherever torch's is.
    z = bias_act(torch.tensor([-0.0]), None, activation)
    assert math.copysign(1, z.item()) == math.copysign(1, NATIVE[activation](torch.tensor([-0.0])).item())


def _exact_float64(activation, values):
    """tanh / sigmoid / silu of each float64 value, computed in 40-digit decimals and rounded."""
    decimal.getcontext().prec = 40
    out = []
    for v in values:
        z = decimal.Decimal(v)
        if activation == "tanh" and abs(z) < decimal.Decimal("1e-3"):
            y = z - z**3 / 3 + 2 * z**5 / 15 - 17 * z**7 / 315  # e^{2z} - 1 would cancel
        elif activation == "tanh":
            e = (2 * z).exp()
            y = (e - 1) / (e + 1)
        else:
            y = 1 / (1 + (-z).exp())
            if activation == "silu":
                y = z * y
        out.append(float(y))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "silu"])
def test_float64_math_is_within_a_few_ulp_of_exact(cpu_isa, activation):
    # Every ISA's branch-free float64 exp and tanh (csrc/common/math.h), through the
    # activations, against 40-digit decimal arithmetic: the whole range where the
    # results are normal numbers, the tanh breakpoint 0.625, and small arguments.
    x = torch.cat(
        [
            torch.linspace(-700, 700, 4001, dtype=torch.float64),
            torch.linspace(-3, 3, 4001, dtype=torch.float64),
            torch.logspace(-300, 1, 1001, dtype=torch.float64),
            -torch.logspace(-300, 1, 1001, dtype=torch.float64),
            torch.tensor([0.625, math.nextafter(0.625, 0), -0.625, 20.0, 36.8, -36.8, 709.0, -709.0],
                         dtype=torch.float64),
        ]
    )
    y = bias_act(x, None, activation)
    exact = _exact_float64(activation, x.tolist())
    ulp = torch.nextafter(exact.abs(), torch.tensor(math.inf, dtype=torch.float64)) - exact.abs()
    normal = exact.abs() > 1e-300  # below, sigmoid's e^x goes subnormal and its ulp with it
    worst = ((y - exact).abs() / ulp)[normal].max().item()
    # Measured: tanh 1.0 ulp, sigmoid and silu 2.0 (exp's 1 ulp plus the division's).
    assert worst <= (2.0 if activation == "tanh" else 2.5), f"worst error {worst:.2f} ulp"
    assert (y - exact)[~normal].abs().max().item() <= 1e-300
    # Specials as torch's float64: NaN, infinities, signed zero.
    specials = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 800.0, -800.0], dtype=torch.float64)
    torch.testing.assert_close(bias_act(specials, None, activation), NATIVE[activation](specials), equal_nan=True,
                               rtol=0, atol=0)
    assert math.copysign(1, bias_act(specials[3:4], None, activation).item()) == math.copysign(
        1, NATIVE[activation](specials[3:4]).item()
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_infinity_propagate_as_in_torch(activation):
    # Compared with torch in float64: torch's float32 CPU gelu gives NaN for +inf in its
    # vectorized loop but +inf in its scalar loop; float64 (and we) give +inf.
    x = torch.tensor([[math.nan, math.inf, -math.inf, 1.0], [0.5, -2.0, math.nan, -math.inf]]).view(2, 4, 1)
    bias = torch.tensor([0.0, 1.0, -1.0, math.nan])
    y = bias_act(x, bias, activation)
    native = NATIVE[activation]((x + bias.view(1, 4, 1)).double())
    assert torch.equal(torch.isnan(y), torch.isnan(native))
    torch.testing.assert_close(y.double(), native, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 5), (0,), (3, 4, 0)])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_empty_tensors_give_empty_results_and_zero_bias_grad(shape, activation):
    x = torch.randn(shape, requires_grad=True)
    bias = torch.randn(shape[1], requires_grad=True) if len(shape) > 1 else None
    y = bias_act(x, bias, activation)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    if bias is not None:
        assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_scalar_and_1d_inputs_without_bias():
    for x in [torch.tensor(-1.5), torch.randn(7)]:
        torch.testing.assert_close(bias_act(x, None, "silu"), F.silu(x))


# ---- backward -----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_backward_matches_float64_oracle(shape, layout, dtype, activation):
    x, bias = _inputs(shape, layout, dtype, "cpu", True)
    x = x.detach().requires_grad_()
    bias = bias.requires_grad_()
    grad_out = make_layout(torch.randn(shape, dtype=dtype), layout if layout != "expanded" else "contiguous")
    gx, gb = torch.autograd.grad(bias_act(x, bias, activation), (x, bias), grad_out)
    xd = x.detach().double().requires_grad_()
    bd = bias.detach().double().requires_grad_()
    ox, ob = torch.autograd.grad(_oracle_forward(xd, bd, activation), (xd, bd), grad_out.double())
    assert gx.shape == x.shape and gb.shape == bias.shape
    if dtype in (torch.float32, torch.float64):
        assert_close_to_oracle(gx, ox, dtype)
        assert_close_to_oracle(gb, ob, dtype)
    else:
        # In half precision the saved output is rounded (1 - y^2 near y = 1 loses every
        # digit), exactly as in torch's own backward: hold us to torch's error instead.
        xn = x.detach().clone().requires_grad_()
        bn = bias.detach().clone().requires_grad_()
        native = NATIVE[activation](xn + bn.view([1, -1] + [1] * (x.dim() - 2)))
        nx, nb = torch.autograd.grad(native, (xn, bn), grad_out)
        assert_no_worse_than_torch(gx, nx, ox, floor=1e-2)
        assert_no_worse_than_torch(gb, nb, ob, floor=5e-2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_without_bias_and_with_input_only_grad(activation, layout):
    x, bias = _inputs((2, 5, 6, 3), layout, torch.float64, "cpu", True)
    x.requires_grad_()
    for b in (None, bias):  # bias given but not requiring grad
        (gx,) = torch.autograd.grad(bias_act(x, b, activation).sum(), x)
        (ox,) = torch.autograd.grad(bias_act_reference(x, b, activation).sum(), x)
        torch.testing.assert_close(gx, ox)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(activation, layout):
    x, bias = _inputs((2, 3, 4, 3), layout, torch.float64, "cpu", True, scale=1.0)
    if activation == "relu":  # keep away from the kink, where finite differences disagree
        x = x + 0.1 * torch.sign(x + bias.view(1, -1, 1, 1))
    x = make_layout(x.detach(), layout).requires_grad_()
    bias.requires_grad_()
    torch.autograd.gradcheck(lambda a, b: bias_act(a, b, activation), (x, bias))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck_float64(activation):
    x, bias = _inputs((2, 3, 5), "contiguous", torch.float64, "cpu", True, scale=1.0)
    if activation == "relu":
        x = x + 0.1 * torch.sign(x + bias.view(1, -1, 1))
    x.requires_grad_()
    bias.requires_grad_()
    torch.autograd.gradgradcheck(lambda a, b: bias_act(a, b, activation), (x, bias))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bias_grad_is_bitwise_identical_for_any_thread_count(layout):
    x, bias = _inputs((8, 24, 33, 31), layout, torch.float32, "cpu", True)
    g = torch.randn(x.shape)
    x.requires_grad_()
    bias.requires_grad_()
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(torch.autograd.grad(bias_act(x, bias, "gelu"), (x, bias), g))
    finally:
        torch.set_num_threads(previous)
    for gx, gb in results[1:]:
        assert torch.equal(gx, results[0][0]) and torch.equal(gb, results[0][1])


@pytest.mark.parametrize("activation,saves", [("relu", "output"), ("sigmoid", "output"), ("gelu", "input")])
def test_backward_saves_output_or_input_never_the_preactivation(activation, saves):
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bias_act(x, bias, activation)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1, f"saved {len(big)} full-size tensors"
    assert big[0].data_ptr() == (y if saves == "output" else x).data_ptr()


def test_backward_reference_matches_autograd_of_reference():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    for activation in ACTIVATIONS:
        xr, br = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = bias_act_reference(xr, br, activation)
        want = torch.autograd.grad(y, (xr, br), g)
        saved = y.detach() if activation in ("identity", "relu", "tanh", "sigmoid") else x
        got = bias_act_backward_reference(g, saved, bias, activation)
        torch.testing.assert_close(got, want)


# ---- op registration: opcheck and torch.compile ---------------------------------------


def _opcheck_samples():
    for activation in ACTIVATIONS:
        for layout in ["contiguous", "channels_last"]:
            x, bias = _inputs((2, 3, 4, 5), layout, torch.float32, "cpu", True)
            yield x.requires_grad_(), bias.requires_grad_(), activation
        yield torch.randn(6, 7, requires_grad=True), None, activation


@pytest.mark.parametrize("sample", list(range(18)))
def test_opcheck(sample):
    x, bias, activation = list(_opcheck_samples())[sample]
    torch.library.opcheck(torch.ops.fastlayers.bias_act.default, (x, bias, activation))


def test_opcheck_backward_op():
    x, bias = _inputs((2, 3, 4, 5), "channels_last", torch.float32, "cpu", True)
    g = torch.randn(x.shape)
    for activation in ("relu", "gelu"):
        torch.library.opcheck(torch.ops.fastlayers.bias_act_backward.default, (g, x, bias, activation))


class _ConvReLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return bias_act(self.conv(x), self.bias, "relu").mean(dim=(2, 3))


def test_torch_compile_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = _ConvReLU()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    y_eager = model(x)
    (g_eager,) = torch.autograd.grad(y_eager.sum(), model.bias)
    y_comp = compiled(x)
    (g_comp,) = torch.autograd.grad(y_comp.sum(), model.bias)
    torch.testing.assert_close(y_comp, y_eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_compiled_graph_calls_the_fastlayers_op():
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    f = torch.compile(lambda a, b: bias_act(a, b, "gelu"), backend=backend, fullgraph=True)
    f(torch.randn(2, 3, 4), torch.randn(3))
    assert "fastlayers.bias_act.default" in seen


# ---- backends and errors ------------------------------------------------------------


def test_reference_backend_runs_the_reference():
    x, bias = torch.randn(2, 3, 4, requires_grad=True), torch.randn(3)
    assert "fastlayers_bias_act" in type(bias_act(x, bias, "relu").grad_fn).__name__
    with fastlayers.use_backend("reference"):
        y = bias_act(x, bias, "relu")
        assert "fastlayers" not in type(y.grad_fn).__name__
    assert fastlayers.get_backend() == "kernels"


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.randn(2, 3), torch.randn(3), "swish"), ValueError, "unknown activation 'swish'"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(4), "relu"), RuntimeError, r"bias must have shape \[3\]"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(1, 3), "relu"), RuntimeError, r"bias must have shape \[3\]"),
        (lambda: (torch.randn(5), torch.randn(5), "relu"), RuntimeError, "must have a channel dimension"),
        (lambda: (torch.randn(2, 3), torch.randn(3, dtype=torch.float64), "relu"), TypeError, "does not match"),
        (lambda: (torch.ones(2, 3, dtype=torch.int32), None, "relu"), TypeError, "must be float32"),
    ],
    ids=["activation", "bias-size", "bias-dims", "no-channels", "bias-dtype", "int-input"],
)
def test_bad_arguments_raise_clear_errors_on_every_backend(backend, make, error, match):
    x, bias, activation = make()
    with fastlayers.use_backend(backend), pytest.raises(error, match=match):
        bias_act(x, bias, activation)


# ---- CUDA ------------------------------------------------------------------------------


@requires_cuda_kernels
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_cuda_forward_and_backward_match_oracle_and_cpu(shape, layout, dtype, activation):
    x, bias = _inputs(shape, layout, dtype, "cuda", True)
    x = x.detach().requires_grad_()
    bias = bias.requires_grad_()
    grad_out = torch.randn(shape, dtype=dtype, device="cuda")
    y = bias_act(x, bias, activation)
    gx, gb = torch.autograd.grad(y, (x, bias), grad_out)
    xd = x.detach().double().requires_grad_()
    bd = bias.detach().double().requires_grad_()
    oracle = _oracle_forward(xd, bd, activation)
    ox, ob = torch.autograd.grad(oracle, (xd, bd), grad_out.double())
    assert y.stride() == (x + bias.view([1, -1] + [1] * (x.dim() - 2))).stride()
    assert_close_to_oracle(y, oracle, dtype)
    assert_close_to_oracle(gx, ox, dtype)
    assert_close_to_oracle(gb, ob, torch.bfloat16 if dtype == torch.float16 else dtype)


@requires_cuda_kernels
@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream_and_is_deterministic():
    x = torch.randn(16, 64, 33, 33, device="cuda", requires_grad=True)
    bias = torch.randn(64, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        results = [torch.autograd.grad(bias_act(x, bias, "silu"), (x, bias), g) for _ in range(3)]
    stream.synchronize()
    for gx, gb in results[1:]:
        assert torch.equal(gx, results[0][0]) and torch.equal(gb, results[0][1])
    torch.testing.assert_close(bias_act(x, bias, "silu"), F.silu(x + bias.view(1, -1, 1, 1)))


@requires_cuda_kernels
@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    x = torch.randn(2, 3, 4, 5, device="cuda", requires_grad=True)
    bias = torch.randn(3, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fastlayers.bias_act.default, (x, bias, "gelu"))
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: bias_act(a, b, "relu").sum(), fullgraph=True)
    torch.testing.assert_close(f(x, bias), torch.relu(x + bias.view(1, -1, 1, 1)).sum())


@pytest.mark.parametrize("device", devices())
def test_every_device_agrees_with_the_reference_backend(device):
    x, bias = _inputs((2, 8, 5, 5), "contiguous", torch.float32, device, True)
    want = bias_act_reference(x, bias, "gelu")
    torch.testing.assert_close(bias_act(x, bias, "gelu"), want, rtol=1e-5, atol=1e-6)
