"""Fused LSTM and Elman RNN: single-step cells and whole layers, forward and backward.

The LSTM (gate order i, f, g, o, as torch)::

    i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)      f = sigmoid(W_if x + b_if + W_hf h + b_hf)
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)         o = sigmoid(W_io x + b_io + W_ho h + b_ho)
    c' = f * c + i * g                               h' = o * tanh(c')

and the Elman RNN ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``, ``act`` = tanh or relu.

* ``torch.ops.fastlayers.{lstm,rnn}_{cell,layer}`` and their ``*_backward`` ops: C++
  and CUDA (csrc/rnn/), schemas in csrc/registration.cpp. A layer runs one GEMM for
  the input projection of all timesteps, then per step the recurrent GEMM and one
  fused pointwise kernel; its backward is the reverse loop of fused pointwise
  backward + one GEMM, then the input and weight gradients as large GEMMs.
* The forward saves what the backward needs and nothing else: the activated gates and
  the cell states (LSTM), the outputs (RNN); never the pre-activations.
* here: fake kernels, autograd, the pure-PyTorch references (fallback and test
  oracle), the functional API and the multi-layer / bidirectional / packed driver
  that ``fastlayers.nn.LSTM`` / ``RNN`` use.

What runs where: every layer runs the layer op, the LSTM's projection (``proj_size``)
included. ``PackedSequence`` data goes to the layer op as it is, with its
``batch_sizes``: step t runs only the sequences that reach it (no padded work), and the
reverse direction runs the steps from last to first, each sequence starting from its
initial state at its own last step (no reversed copies). Higher-order gradients
(``create_graph=True``) are computed by differentiating the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlayers import _extension, backend
from fastlayers.ops.autograd import register_autograd

NONLINEARITIES = ("tanh", "relu")
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- checks (the C++ entry's, same messages and exception types) --------------------


def _check_like_input(op, name, t, input):
    if t.device != input.device:
        raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    if t.dtype != input.dtype:
        raise TypeError(f"{op}: {name} dtype {t.dtype} does not match input dtype {input.dtype}")


def check_args(op, gates, input, hx, cx, w_ih, w_hh, b_ih, b_hh, *, layer: bool, w_hr=None, batch_sizes=None) -> None:
    """Checks of a cell (input [B, I]) or layer (input [T, B, I], or packed [rows, I] with
    `batch_sizes`) op; `gates` = 4 (LSTM) or 1; `w_hr` [P, H] the LSTM projection, with
    which w_hh is [4H, P] and hx [B, P]. The values of `batch_sizes` are checked by
    :func:`check_batch_sizes` (the fake kernels cannot read them)."""
    batch = input.shape[-2] if input.dim() >= 2 else None
    if batch_sizes is not None:
        if input.dim() != 2:
            raise RuntimeError(
                f"{op}: with batch_sizes, input must be 2-D packed data [rows, input_size], got shape {list(input.shape)}"
            )
        if batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1 \
                or batch_sizes.numel() < 1:
            raise RuntimeError(
                f"{op}: batch_sizes must be a non-empty 1-D int64 CPU tensor (a PackedSequence's), got "
                f"{batch_sizes.dtype} of shape {list(batch_sizes.shape)} on {batch_sizes.device}"
            )
        batch = hx.shape[0] if hx.dim() == 2 else batch
    elif layer:
        if input.dim() != 3:
            raise RuntimeError(f"{op}: input must be 3-D [seq_len, batch, input_size], got shape {list(input.shape)}")
        if input.shape[0] < 1:
            raise RuntimeError(f"{op}: input must have at least one time step, got shape {list(input.shape)}")
    elif input.dim() != 2:
        raise RuntimeError(f"{op}: input must be 2-D [batch, input_size], got shape {list(input.shape)}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    input_size = input.shape[-1]
    if w_hr is not None:
        if w_hr.dim() != 2:
            raise RuntimeError(f"{op}: w_hr must be 2-D [proj_size, hidden_size], got {list(w_hr.shape)}")
        hidden, output_size = w_hr.shape[1], w_hr.shape[0]
        if w_hh.dim() != 2 or w_hh.shape[0] != gates * hidden or w_hh.shape[1] != output_size:
            raise RuntimeError(
                f"{op}: with w_hr of shape {list(w_hr.shape)}, w_hh must have shape "
                f"[{gates * hidden}, {output_size}], got {list(w_hh.shape)}"
            )
        _check_like_input(op, "w_hr", w_hr, input)
    else:
        if w_hh.dim() != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
            raise RuntimeError(
                f"{op}: w_hh must have shape [{gates} * hidden_size, hidden_size], got {list(w_hh.shape)}"
            )
        hidden = output_size = w_hh.shape[1]
    if w_ih.dim() != 2 or w_ih.shape[0] != gates * hidden:
        raise RuntimeError(
            f"{op}: w_ih must have shape [{gates * hidden}, input_size] ({gates} * hidden_size rows, as w_hh), "
            f"got {list(w_ih.shape)}"
        )
    if input_size != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input_size} expected {w_ih.shape[1]}")
    for state, name, size in ((hx, "hidden0", output_size), (cx, "hidden1", hidden)):
        if state is None:
            continue
        if state.dim() != 2:
            raise RuntimeError(f"{op}: {name} must be 2-D [batch, hidden_size], got shape {list(state.shape)}")
        if state.shape[0] != batch:
            raise RuntimeError(f"Input batch size {batch} doesn't match {name} batch size {state.shape[0]}")
        if state.shape[1] != size:
            raise RuntimeError(f"{name} has inconsistent hidden_size: got {state.shape[1]}, expected {size}")
        _check_like_input(op, name, state, input)
    _check_like_input(op, "w_ih", w_ih, input)
    _check_like_input(op, "w_hh", w_hh, input)
    for bias, name in ((b_ih, "b_ih"), (b_hh, "b_hh")):
        if bias is None:
            continue
        if bias.dim() != 1 or bias.shape[0] != gates * hidden:
            raise RuntimeError(f"{op}: {name} must have shape [{gates * hidden}], got {list(bias.shape)}")
        _check_like_input(op, name, bias, input)


def check_batch_sizes(op, batch_sizes, input, hx) -> None:
    """The values of a packed layer input's batch_sizes (the C++ entry checks them too)."""
    sizes = batch_sizes.tolist()
    if any(s < 1 for s in sizes) or any(b > a for a, b in zip(sizes, sizes[1:])):
        raise RuntimeError(
            f"{op}: batch_sizes must be positive and non-increasing (sequences sorted by decreasing length), "
            f"got {batch_sizes}"
        )
    if sum(sizes) != input.shape[0]:
        raise RuntimeError(f"{op}: batch_sizes sum to {sum(sizes)} but the packed input has {input.shape[0]} rows")
    if sizes[0] != hx.shape[0]:
        raise RuntimeError(f"Input batch size {sizes[0]} doesn't match hidden0 batch size {hx.shape[0]}")


def _check_nonlinearity(op, nonlinearity):
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"{op}: unknown nonlinearity '{nonlinearity}'; expected 'tanh' or 'relu'")


# ---- references ---------------------------------------------------------------------


def lstm_cell_reference(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One LSTM step in plain PyTorch ops: returns (h', c')."""
    h, c = hx
    z = F.linear(input, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    zi, zf, zg, zo = z.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo)
    c_next = f * c + i * g
    return o * torch.tanh(c_next), c_next


def rnn_cell_reference(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One Elman RNN step in plain PyTorch ops: returns h'."""
    z = F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh)
    return torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)


def _steps(input, batch_sizes):
    """The per-step inputs of a layer: input [T, B, I] unbound, or packed data split by batch_sizes."""
    return list(input.unbind(0)) if batch_sizes is None else list(input.split(batch_sizes.tolist()))


def _run_steps(step, input, states, batch_sizes, reverse):
    """The step loop of the layer references: `step(x, states)` -> (output, new states)
    per step, in order or reversed. Step t runs the first x.shape[0] batch rows (packed:
    the sequences that reach t); the other rows keep their states, so a forward
    sequence ends with its state at its last step, and a reverse one starts from its
    initial state there. Returns the per-step results stacked (time-major) or
    concatenated (packed)."""
    xs = _steps(input, batch_sizes)
    results = [None] * len(xs)
    for t in reversed(range(len(xs))) if reverse else range(len(xs)):
        rows = xs[t].shape[0]
        new_states = step(xs[t], [s[:rows] for s in states])
        results[t] = new_states
        states = [torch.cat((n, s[rows:])) if rows < s.shape[0] else n for n, s in zip(new_states, states)]
    join = torch.stack if batch_sizes is None else torch.cat
    return [join([r[k] for r in results]) for k in range(len(states))]


def lstm_layer_reference(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None, reverse=False):
    """One LSTM layer over time-major input [T, B, I] (or packed data [rows, I] with
    ``batch_sizes``; ``reverse``: steps last to first): (output [T, B, H or P], cells
    [T, B, H]); with the projection w_hr [P, H] each step's output is h W_hr^T."""

    def step(x, states):
        h, c = lstm_cell_reference(x, tuple(states), w_ih, w_hh, b_ih, b_hh)
        return [F.linear(h, w_hr) if w_hr is not None else h, c]

    output, cells = _run_steps(step, input, [hx, cx], batch_sizes, reverse)
    return output, cells


def rnn_layer_reference(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh", batch_sizes=None,
                        reverse=False):
    """One Elman RNN layer over time-major input [T, B, I] (or packed, see
    :func:`lstm_layer_reference`): output [T, B, H]."""

    def step(x, states):
        return [rnn_cell_reference(x, states[0], w_ih, w_hh, b_ih, b_hh, nonlinearity)]

    return _run_steps(step, input, [hx], batch_sizes, reverse)[0]


# ---- torch.library registrations ------------------------------------------------------


def _grads_through_reference(reference, inputs, outputs_grads):
    """Gradients of `reference(*inputs)` with a graph (create_graph=True): double backward."""
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, outputs_grads) if g is not None]
    grads = iter(
        torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True
        )
    )
    return tuple(next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs)


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


if _extension.available():

    @torch.library.register_fake("fastlayers::lstm_cell")
    def _lstm_cell_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        check_args("lstm_cell", 4, input, hx, cx, w_ih, w_hh, b_ih, b_hh, layer=False)
        batch, hidden = input.shape[0], w_hh.shape[1]
        return input.new_empty(batch, hidden), input.new_empty(batch, hidden), input.new_empty(batch, 4 * hidden)

    @torch.library.register_fake("fastlayers::lstm_cell_backward")
    def _lstm_cell_backward_fake(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, gates, cy, has_bias):
        check_args("lstm_cell_backward", 4, input, hx, cx, w_ih, w_hh, None, None, layer=False)
        bias = input.new_empty(w_ih.shape[0] if has_bias else 0)
        return (
            torch.empty_like(input, memory_format=torch.contiguous_format),
            hx.new_empty(hx.shape),
            cx.new_empty(cx.shape),
            w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape),
            bias,
        )

    @torch.library.register_fake("fastlayers::rnn_cell")
    def _rnn_cell_fake(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
        _check_nonlinearity("rnn_cell", nonlinearity)
        check_args("rnn_cell", 1, input, hx, None, w_ih, w_hh, b_ih, b_hh, layer=False)
        return input.new_empty(input.shape[0], w_hh.shape[1])

    @torch.library.register_fake("fastlayers::rnn_cell_backward")
    def _rnn_cell_backward_fake(grad_hy, input, hx, w_ih, w_hh, hy, has_bias, nonlinearity):
        _check_nonlinearity("rnn_cell_backward", nonlinearity)
        check_args("rnn_cell_backward", 1, input, hx, None, w_ih, w_hh, None, None, layer=False)
        return (
            torch.empty_like(input, memory_format=torch.contiguous_format),
            hx.new_empty(hx.shape),
            w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape),
            input.new_empty(w_ih.shape[0] if has_bias else 0),
        )

    @torch.library.register_fake("fastlayers::lstm_layer")
    def _lstm_layer_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr=None, batch_sizes=None, reverse=False):
        check_args(
            "lstm_layer", 4, input, hx, cx, w_ih, w_hh, b_ih, b_hh, layer=True, w_hr=w_hr, batch_sizes=batch_sizes
        )
        rows, hidden = input.shape[:-1], w_hh.shape[0] // 4
        return (
            input.new_empty(*rows, hx.shape[1]),
            input.new_empty(*rows, hidden),
            input.new_empty(*rows, 4 * hidden),
        )

    @torch.library.register_fake("fastlayers::lstm_layer_backward")
    def _lstm_layer_backward_fake(
        grad_output, grad_cells, input, hx, cx, w_ih, w_hh, output, cells, gates, has_bias, w_hr=None,
        batch_sizes=None, reverse=False, input_grad=True, weight_grad=True,
    ):
        check_args(
            "lstm_layer_backward", 4, input, hx, cx, w_ih, w_hh, None, None, layer=True, w_hr=w_hr,
            batch_sizes=batch_sizes,
        )
        return (
            _grad_like(input, input_grad),
            hx.new_empty(hx.shape),
            cx.new_empty(cx.shape),
            _grad_like(w_ih, weight_grad),
            _grad_like(w_hh, weight_grad),
            input.new_empty(w_ih.shape[0] if has_bias and weight_grad else 0),
            input.new_empty(w_hr.shape if w_hr is not None and weight_grad else (0,)),
        )

    @torch.library.register_fake("fastlayers::rnn_layer")
    def _rnn_layer_fake(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes=None, reverse=False):
        _check_nonlinearity("rnn_layer", nonlinearity)
        check_args("rnn_layer", 1, input, hx, None, w_ih, w_hh, b_ih, b_hh, layer=True, batch_sizes=batch_sizes)
        return input.new_empty(*input.shape[:-1], w_hh.shape[1])

    @torch.library.register_fake("fastlayers::rnn_layer_backward")
    def _rnn_layer_backward_fake(
        grad_output, input, hx, w_ih, w_hh, output, has_bias, nonlinearity, batch_sizes=None, reverse=False,
        input_grad=True, weight_grad=True,
    ):
        _check_nonlinearity("rnn_layer_backward", nonlinearity)
        check_args(
            "rnn_layer_backward", 1, input, hx, None, w_ih, w_hh, None, None, layer=True, batch_sizes=batch_sizes
        )
        return (
            _grad_like(input, input_grad),
            hx.new_empty(hx.shape),
            _grad_like(w_ih, weight_grad),
            _grad_like(w_hh, weight_grad),
            input.new_empty(w_ih.shape[0] if has_bias and weight_grad else 0),
        )

    def _grad_like(t, computed):
        """A layer backward's gradient of `t`: contiguous, or shape [0] when not computed."""
        return torch.empty_like(t, memory_format=torch.contiguous_format) if computed else t.new_empty(0)

    def _wanted(ctx, weights):
        """(input_grad, weight_grad) for the layer backward ops: whether autograd wants the
        input's gradient, and any of the weights' and biases' (inputs at `weights`)."""
        needs = ctx.needs_input_grad
        return needs[0], any(needs[i] for i in weights if i < len(needs))

    def _bias_grads(ctx, grad_bias):
        b_ih, b_hh = ctx.has_b_ih, ctx.has_b_hh
        return (grad_bias if b_ih else None), (grad_bias if b_hh else None)

    def _weight_grads(ctx, computed, grad_w_ih, grad_w_hh, grad_bias, *more):
        """The weights' and biases' gradients as a backward returns them; all None when the
        layer op left them out (weight_grad false)."""
        grads = (grad_w_ih, grad_w_hh, *_bias_grads(ctx, grad_bias), *more)
        return grads if computed else (None,) * len(grads)

    # LSTM (cell and layer): the activated gates are an implementation output, not differentiable.
    def _lstm_setup_context(ctx, inputs, output):
        input, hx, cx, w_ih, w_hh, b_ih, b_hh = inputs[:7]
        # The layer's projection, packed batch sizes and direction.
        w_hr, ctx.batch_sizes, ctx.reverse = inputs[7:] if len(inputs) > 7 else (None, None, False)
        hy_or_output, cy_or_cells, gates = output
        ctx.mark_non_differentiable(gates)
        # Unused outputs' gradients arrive as None: without this autograd would fill a
        # zero tensor of the gates' size [T, B, 4H] on every backward call.
        ctx.set_materialize_grads(False)
        ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
        ctx.save_for_backward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, hy_or_output, cy_or_cells, gates, w_hr)

    def _lstm_cell_backward(ctx, grad_hy, grad_cy, _grad_gates):
        input, hx, cx, w_ih, w_hh, b_ih, b_hh, hy, cy, gates, _ = ctx.saved_tensors
        grad_hy, grad_cy = _zeros_if_none(grad_hy, hy), _zeros_if_none(grad_cy, cy)
        if torch.is_grad_enabled():
            return _grads_through_reference(
                lambda x, h, c, wi, wh, bi, bh: lstm_cell_reference(x, (h, c), wi, wh, bi, bh),
                (input, hx, cx, w_ih, w_hh, b_ih, b_hh),
                (grad_hy, grad_cy),
            )
        grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias = torch.ops.fastlayers.lstm_cell_backward.default(
            grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, gates, cy, ctx.has_b_ih or ctx.has_b_hh
        )
        return (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, *_bias_grads(ctx, grad_bias))

    def _lstm_layer_backward(ctx, grad_output, grad_cells, _grad_gates):
        input, hx, cx, w_ih, w_hh, b_ih, b_hh, output, cells, gates, w_hr = ctx.saved_tensors
        grad_output, grad_cells = _zeros_if_none(grad_output, output), _zeros_if_none(grad_cells, cells)
        if torch.is_grad_enabled():
            grads = _grads_through_reference(
                lambda *args: lstm_layer_reference(*args, ctx.batch_sizes, ctx.reverse),
                (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr),
                (grad_output, grad_cells),
            )
            return (*grads, None, None)
        input_grad, weight_grad = _wanted(ctx, range(3, 8))
        grads = torch.ops.fastlayers.lstm_layer_backward.default(
            grad_output, grad_cells, input, hx, cx, w_ih, w_hh, output, cells, gates, ctx.has_b_ih or ctx.has_b_hh,
            w_hr, ctx.batch_sizes, ctx.reverse, input_grad, weight_grad,
        )
        grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = grads
        return (
            grad_input if input_grad else None,
            grad_hx,
            grad_cx,
            *_weight_grads(ctx, weight_grad, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr if w_hr is not None else None),
            None,
            None,
        )

    def _rnn_setup_context(ctx, inputs, output):
        input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity = inputs[:7]
        ctx.nonlinearity = nonlinearity
        ctx.batch_sizes, ctx.reverse = inputs[7:] if len(inputs) > 7 else (None, False)  # the layer's
        ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
        ctx.save_for_backward(input, hx, w_ih, w_hh, b_ih, b_hh, output)

    def _rnn_backward(layer):
        reference = rnn_layer_reference if layer else rnn_cell_reference
        backward_op = torch.ops.fastlayers.rnn_layer_backward if layer else torch.ops.fastlayers.rnn_cell_backward

        def backward(ctx, grad_output):
            input, hx, w_ih, w_hh, b_ih, b_hh, output = ctx.saved_tensors
            layout = (ctx.batch_sizes, ctx.reverse) if layer else ()
            if torch.is_grad_enabled():
                grads = _grads_through_reference(
                    lambda x, h, wi, wh, bi, bh: reference(x, h, wi, wh, bi, bh, ctx.nonlinearity, *layout),
                    (input, hx, w_ih, w_hh, b_ih, b_hh),
                    (grad_output,),
                )
                return (*grads, None, *(None for _ in layout))
            # The layer op computes the input's and the weights' gradients only when wanted.
            input_grad, weight_grad = _wanted(ctx, range(2, 6)) if layer else (True, True)
            grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias = backward_op.default(
                grad_output, input, hx, w_ih, w_hh, output, ctx.has_b_ih or ctx.has_b_hh, ctx.nonlinearity, *layout,
                *((input_grad, weight_grad) if layer else ())
            )
            return (grad_input if input_grad else None, grad_hx,
                    *_weight_grads(ctx, weight_grad, grad_w_ih, grad_w_hh, grad_bias), None, *(None for _ in layout))

        return backward

    register_autograd("fastlayers::lstm_cell", _lstm_cell_backward, setup_context=_lstm_setup_context)
    register_autograd("fastlayers::lstm_layer", _lstm_layer_backward, setup_context=_lstm_setup_context)
    register_autograd("fastlayers::rnn_cell", _rnn_backward(False), setup_context=_rnn_setup_context)
    register_autograd("fastlayers::rnn_layer", _rnn_backward(True), setup_context=_rnn_setup_context)


# ---- functional API: cells ------------------------------------------------------------


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One fused LSTM step, as ``torch._VF.lstm_cell``: returns ``(h', c')``.

    Args:
        input: ``(B, I)``; hx: the pair ``(h, c)``, each ``(B, H)``;
        w_ih: ``(4H, I)``; w_hh: ``(4H, H)``; b_ih, b_hh: optional ``(4H,)``.
    """
    h, c = hx
    check_args("lstm_cell", 4, input, h, c, w_ih, w_hh, b_ih, b_hh, layer=False)
    if backend.use_kernels(input.device):
        hy, cy, _ = torch.ops.fastlayers.lstm_cell.default(input, h, c, w_ih, w_hh, b_ih, b_hh)
        return hy, cy
    return lstm_cell_reference(input, (h, c), w_ih, w_hh, b_ih, b_hh)


def _rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    check_args("rnn_cell", 1, input, hx, None, w_ih, w_hh, b_ih, b_hh, layer=False)
    if backend.use_kernels(input.device):
        return torch.ops.fastlayers.rnn_cell.default(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return rnn_cell_reference(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One fused Elman RNN step ``tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)``, as ``torch._VF.rnn_tanh_cell``."""
    return _rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, "tanh")


def rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One fused Elman RNN step ``relu(x W_ih^T + b_ih + h W_hh^T + b_hh)``, as ``torch._VF.rnn_relu_cell``."""
    return _rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, "relu")


# ---- functional API: layers -------------------------------------------------------------


def _lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes=None, reverse=False):
    """One direction of one layer, time-major or packed: (output [T, B, H or P], cells [T, B, H])."""
    if backend.use_kernels(input.device):
        output, cells, _ = torch.ops.fastlayers.lstm_layer.default(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse
        )
        return output, cells
    check_args("lstm_layer", 4, input, h0, c0, w_ih, w_hh, b_ih, b_hh, layer=True, w_hr=w_hr, batch_sizes=batch_sizes)
    if batch_sizes is not None:
        check_batch_sizes("lstm_layer", batch_sizes, input, h0)
    return lstm_layer_reference(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)


def _rnn_layer(input, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes=None, reverse=False):
    """One direction of one layer, time-major or packed: output [T, B, H]."""
    if backend.use_kernels(input.device):
        return torch.ops.fastlayers.rnn_layer.default(
            input, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes, reverse
        )
    check_args("rnn_layer", 1, input, h0, None, w_ih, w_hh, b_ih, b_hh, layer=True, batch_sizes=batch_sizes)
    if batch_sizes is not None:
        check_batch_sizes("rnn_layer", batch_sizes, input, h0)
    return rnn_layer_reference(input, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes, reverse)


def _final_rows(batch_sizes, device):
    """Rows of a packed forward direction's output that hold each sequence's final state."""
    batch = int(batch_sizes[0])
    rows = torch.arange(batch)
    lengths = (batch_sizes.unsqueeze(1) > rows).sum(0)
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes
    return (starts[lengths - 1] + rows).to(device)


def _run_direction(mode, x, batch_sizes, final_rows, h0, c0, weights, reverse, nonlinearity):
    """One direction of one layer: (output, h_n, c_n); x is time-major [T, B, I] when
    batch_sizes is None, else packed data, whose sequences end at rows final_rows()."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    if mode == "lstm":
        output, cells = _lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    else:
        output, cells = _rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes, reverse), None

    def final(states):
        if states is None:
            return None
        if batch_sizes is None:
            return states[0] if reverse else states[-1]
        # Reverse: every sequence ends at step 0, the first rows; forward: at its own last step.
        return states[: h0.shape[0]] if reverse else states[final_rows()]

    return output, final(output), final(cells)


def _stack(mode, input, batch_sizes, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional,
           nonlinearity, proj):
    directions = 2 if bidirectional else 1
    per_direction = 2 + (2 if has_biases else 0) + (1 if proj else 0)
    if len(params) != num_layers * directions * per_direction:
        raise ValueError(
            f"{mode}: expected {num_layers * directions * per_direction} weight tensors "
            f"({num_layers} layers x {directions} directions x {per_direction}), got {len(params)}"
        )
    rows = []

    def final_rows():
        # Computed once a layer op has checked batch_sizes, and shared by every layer.
        if not rows:
            rows.append(_final_rows(batch_sizes, input.device))
        return rows[0]

    if batch_sizes is not None:
        total = int(batch_sizes.sum())
        if total < input.shape[0]:
            input = input[:total]  # as torch: packed rows past the batch sizes' sum are ignored
    layer_input = input
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = params[k * per_direction : (k + 1) * per_direction]
            weights = (
                w[0],
                w[1],
                w[2] if has_biases else None,
                w[3] if has_biases else None,
                w[-1] if proj else None,
            )
            out, h, c = _run_direction(
                mode, layer_input, batch_sizes, final_rows, h0[k], None if c0 is None else c0[k], weights,
                direction == 1, nonlinearity,
            )
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)


def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, batch_sizes=None):
    """Multi-layer LSTM with ``torch._VF.lstm``'s arguments: returns ``(output, h_n, c_n)``.

    ``params`` is the flat weight list of ``torch.nn.LSTM`` (per layer and direction
    ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``); ``hx = (h_0, c_0)``; a projection is
    recognised, as torch does, by ``h_0`` being narrower than ``c_0``. With
    ``batch_sizes`` (a ``PackedSequence``'s), ``input`` is the packed data and
    ``batch_first`` is ignored. Dropout (training only) applies to the outputs of every
    layer but the last.
    """
    h0, c0 = hx
    proj = h0.shape[-1] != c0.shape[-1]
    x = input.transpose(0, 1) if batch_first and batch_sizes is None else input
    output, h_n, c_n = _stack(
        "lstm", x, batch_sizes, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, None, proj
    )
    if batch_first and batch_sizes is None:
        output = output.transpose(0, 1)
    return output, h_n, c_n


def rnn(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, nonlinearity="tanh",
        batch_sizes=None):
    """Multi-layer Elman RNN with ``torch._VF.rnn_tanh``'s arguments plus ``nonlinearity``
    (``"tanh"`` or ``"relu"``): returns ``(output, h_n)``. See :func:`lstm` for ``batch_sizes``."""
    _check_nonlinearity("rnn", nonlinearity)
    x = input.transpose(0, 1) if batch_first and batch_sizes is None else input
    output, h_n, _ = _stack(
        "rnn", x, batch_sizes, hx, None, params, has_biases, num_layers, dropout, train, bidirectional, nonlinearity,
        False,
    )
    if batch_first and batch_sizes is None:
        output = output.transpose(0, 1)
    return output, h_n
