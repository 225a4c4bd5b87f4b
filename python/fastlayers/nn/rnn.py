"""Drop-in ``LSTM``, ``RNN``, ``LSTMCell`` and ``RNNCell`` running the fused kernels.

Each module has its ``torch.nn`` twin's constructor, parameter names, shapes, gate
order and initialisation (they share torch's ``RNNBase`` / ``RNNCellBase`` code), so
``load_state_dict`` works both ways, and the same forward contract: optional initial
state, unbatched input, ``batch_first``, ``PackedSequence`` in and out, dropout
between layers in training mode, bidirectional layers, ``proj_size`` for the LSTM.
The shape checks are torch's own, so they raise torch's errors.

``LSTM`` / ``RNN`` derive from ``torch.nn.RNNBase`` rather than ``torch.nn.LSTM``:
Dynamo refuses to trace ``isinstance(m, nn.LSTM)`` modules (it graph-breaks there),
while these compile with ``fullgraph=True``.

Every layer and direction runs the whole-layer op (projection included; packed input
as it is, each step running only the sequences that reach it, see ``fastlayers.ops.rnn``).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence

from fastlayers.ops import rnn as _ops


def _copy_from(cls, module, **kwargs):
    reference = next(module.parameters())
    ours = cls(**kwargs, device=reference.device, dtype=reference.dtype)
    ours.load_state_dict(module.state_dict())
    return ours.train(module.training)


class LSTM(torch.nn.RNNBase):
    """``torch.nn.LSTM`` with fused kernels; same arguments, parameters and outputs."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden

    @classmethod
    def from_torch(cls, module: torch.nn.LSTM) -> LSTM:
        """A fastlayers LSTM with `module`'s hyperparameters, parameters, device, dtype and mode."""
        return _copy_from(
            cls,
            module,
            input_size=module.input_size,
            hidden_size=module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            proj_size=module.proj_size,
        )

    def forward(self, input, hx=None):
        self._update_flat_weights()
        orig_input = input
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch_sizes = None
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                hx = self._zero_state(input, max_batch_size, real_hidden_size)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(input, hx, batch_sizes)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
            if hx is None:
                hx = self._zero_state(input, max_batch_size, real_hidden_size)
            else:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        raise RuntimeError(
                            "For batched 3-D input, hx and cx should "
                            f"also be 3-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should "
                            f"also be 2-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(input, hx, batch_sizes)
        output, h_n, c_n = _ops.lstm(
            input,
            hx,
            self._flat_weights,
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            self.batch_first,
            batch_sizes=batch_sizes,
        )
        hidden = (h_n, c_n)
        if isinstance(orig_input, PackedSequence):
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                hidden, unsorted_indices
            )
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _zero_state(self, input, batch, real_hidden_size):
        layers = self.num_layers * (2 if self.bidirectional else 1)
        h = torch.zeros(layers, batch, real_hidden_size, dtype=input.dtype, device=input.device)
        c = torch.zeros(layers, batch, self.hidden_size, dtype=input.dtype, device=input.device)
        return h, c


class RNN(torch.nn.RNNBase):
    """``torch.nn.RNN`` (Elman, tanh or relu) with fused kernels; same arguments, parameters and outputs."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)

    @classmethod
    def from_torch(cls, module: torch.nn.RNN) -> RNN:
        """A fastlayers RNN with `module`'s hyperparameters, parameters, device, dtype and mode."""
        return _copy_from(
            cls,
            module,
            input_size=module.input_size,
            hidden_size=module.hidden_size,
            num_layers=module.num_layers,
            nonlinearity=module.nonlinearity,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
        )

    def forward(self, input, hx=None):
        self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        orig_input = input
        batch_sizes = None
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                        )
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
        if hx is None:
            hx = torch.zeros(
                self.num_layers * num_directions,
                max_batch_size,
                self.hidden_size,
                dtype=input.dtype,
                device=input.device,
            )
        self.check_forward_args(input, hx, batch_sizes)
        output, hidden = _ops.rnn(
            input,
            hx,
            self._flat_weights,
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            self.batch_first,
            nonlinearity=self.nonlinearity,
            batch_sizes=batch_sizes,
        )
        if isinstance(orig_input, PackedSequence):
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                hidden, unsorted_indices
            )
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = hidden.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)


class LSTMCell(torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` running the fused cell kernel."""

    @classmethod
    def from_torch(cls, module: torch.nn.LSTMCell) -> LSTMCell:
        """A fastlayers LSTMCell with `module`'s sizes, parameters, device, dtype and mode."""
        return _copy_from(cls, module, input_size=module.input_size, hidden_size=module.hidden_size, bias=module.bias)

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        else:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if not is_batched else hx
        hy, cy = _ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not is_batched:
            return hy.squeeze(0), cy.squeeze(0)
        return hy, cy


class RNNCell(torch.nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) running the fused cell kernel."""

    @classmethod
    def from_torch(cls, module: torch.nn.RNNCell) -> RNNCell:
        """A fastlayers RNNCell with `module`'s sizes, nonlinearity, parameters, device, dtype and mode."""
        return _copy_from(
            cls,
            module,
            input_size=module.input_size,
            hidden_size=module.hidden_size,
            bias=module.bias,
            nonlinearity=module.nonlinearity,
        )

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        else:
            hx = hx.unsqueeze(0) if not is_batched else hx
        if self.nonlinearity == "tanh":
            ret = _ops.rnn_tanh_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        elif self.nonlinearity == "relu":
            ret = _ops.rnn_relu_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        else:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return ret.squeeze(0) if not is_batched else ret
