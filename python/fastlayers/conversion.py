"""Swap ``torch.nn`` layers for their fastlayers twins inside any model, and back.

    model = fastlayers.convert(model)             # in place; returns the model
    model = fastlayers.convert(model, fuse=True)  # also fuses Conv2d -> ReLU (-> MaxPool2d)
    model = fastlayers.revert(model)              # torch.nn layers again, same weights

``convert`` walks ``named_children`` recursively and replaces every module whose type
is exactly ``torch.nn.Conv1d``, ``Conv2d``, ``LSTM``, ``LSTMCell``, ``RNN``, ``RNNCell``
or ``MultiheadAttention`` by its ``fastlayers.nn`` twin. The twin is built with the
same hyperparameters on the meta device and then takes over the original's own
Parameter and buffer objects (so an optimizer built before the conversion keeps
updating the model), its submodules (``MultiheadAttention.out_proj``), every hook dict
(forward, pre-forward, backward, state_dict, load_state_dict) and its train/eval flag;
the device and dtype follow from the parameters. (The twins' ``from_torch`` is the
copying API: it allocates and copies every weight and goes through ``state_dict``, so
its hooks would run.) A module shared at several places is replaced by one twin.

Left alone, and said so:

* subclasses of those types (the user's own forward may rely on anything; verbose line),
* modules that convert cannot carry exactly: parametrized ones
  (``torch.nn.utils.parametrize``), and any whose own parameters or buffers differ from
  the twin's (old-style ``weight_norm`` / ``spectral_norm``, pruning), with a warning.

``fuse=True`` also replaces each run ``Conv2d, ReLU[, MaxPool2d(2, 2)]`` inside an
``nn.Sequential`` by ``Conv2dReLU`` / ``Conv2dReLUMaxPool2d`` followed by one
``nn.Identity`` per absorbed layer, so the indices (and state_dict keys) of the other
layers do not move. A run is fused only when the fused op computes the same thing: the
pool has kernel 2, stride 2, padding 0, dilation 1, no ``ceil_mode`` and no
``return_indices``, and none of the three modules has hooks (a hook on the convolution
or the ReLU would lose its output).

``revert`` turns each fastlayers layer back into its ``torch.nn`` twin the same way. A
fused block followed by its ``nn.Identity`` placeholders in an ``nn.Sequential`` becomes
``Conv2d``, ``ReLU`` and ``MaxPool2d(2, 2)`` at those indices, so ``revert(convert(m,
fuse=True))`` has ``m``'s state_dict keys; a fused block anywhere else becomes
``nn.Sequential(Conv2d, ReLU, MaxPool2d)`` (its keys gain a ``0.``). ``LuongAttention``
has no ``torch.nn`` twin and stays.
"""

from __future__ import annotations

import warnings
from collections import Counter

from torch import nn
from torch.nn.modules.utils import _pair
from torch.nn.utils import parametrize

from fastlayers import nn as fnn
from fastlayers.nn.attention import mha_constructor_args
from fastlayers.nn.conv import conv_constructor_args

__all__ = ["convert", "revert"]

_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: fnn.Conv1d,
    nn.Conv2d: fnn.Conv2d,
    nn.LSTM: fnn.LSTM,
    nn.LSTMCell: fnn.LSTMCell,
    nn.RNN: fnn.RNN,
    nn.RNNCell: fnn.RNNCell,
    nn.MultiheadAttention: fnn.MultiheadAttention,
}
_TORCH_TWINS = {ours: theirs for theirs, ours in _TWINS.items()}
_FUSED = (fnn.Conv2dReLU, fnn.Conv2dReLUMaxPool2d)

# Everything a Module keeps besides its parameters, buffers, submodules and mode: the
# hook dicts and the set of non-persistent buffer names (read from torch itself, so a
# hook kind added by a later torch is carried too).
_MODULE_STATE = tuple(
    name for name in vars(nn.Module()) if name not in ("training", "_parameters", "_buffers", "_modules")
)
_HOOK_STATE = tuple(name for name in _MODULE_STATE if "hook" in name)


class _CannotCarry(Exception):
    pass


def _type_name(module_or_type) -> str:
    cls = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    module = cls.__module__
    for private, public in (("torch.nn.modules.", "torch.nn"), ("fastlayers.nn.", "fastlayers.nn")):
        if module.startswith(private):
            module = public
    return f"{module}.{cls.__qualname__}"


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name) for name in _HOOK_STATE if name != "_is_full_backward_hook")


def _reparametrization(module: nn.Module) -> str | None:
    """What makes `module`'s weights differ from its parameters, if anything: a
    torch.nn.utils.parametrize parametrization, or an old-style pre-forward hook of
    torch.nn.utils (weight_norm, spectral_norm, prune) that recomputes them."""
    if parametrize.is_parametrized(module):
        return f"parametrized ({', '.join(module.parametrizations)}; torch.nn.utils.parametrize)"
    for hook in module._forward_pre_hooks.values():
        if type(hook).__module__.startswith("torch.nn.utils"):
            return f"its weights are recomputed by a {type(hook).__name__} hook ({type(hook).__module__})"
    return None


def _carry(old: nn.Module, new: nn.Module) -> nn.Module:
    """Move `old`'s own parameters, buffers, submodules, hooks and mode onto `new`
    (built with the same hyperparameters); _CannotCarry if `old` lacks one of `new`'s.
    Extra ones (registered by the user) come along: the layer's forward does not read
    them, the hooks that may read them come along too."""
    for kind in ("_parameters", "_buffers", "_modules"):
        missing = set(getattr(new, kind)) - set(getattr(old, kind))
        if missing:
            raise _CannotCarry(f"it has no {kind[1:]} {sorted(missing)}, which {_type_name(new)} needs")
    for name, param in old._parameters.items():
        if name in new._parameters:
            setattr(new, name, param)  # setattr: RNNBase keeps its _flat_weights list in step
        else:
            new.register_parameter(name, param)
    new._buffers.update(old._buffers)
    new._modules.update(old._modules)
    for name in _MODULE_STATE:
        object.__setattr__(new, name, getattr(old, name))
    new.training = old.training
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
    return new


def _conv_twin(module: nn.Conv2d | nn.Conv1d, cls: type) -> nn.Module:
    return cls(**conv_constructor_args(module), device="meta")


def _twin(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` with `module`'s hyperparameters, its parameters on the meta device
    (`_carry` puts the real ones in). fastlayers' layers take their torch.nn twins'
    constructor arguments, so one builder serves both directions."""
    if issubclass(cls, (nn.Conv1d, nn.Conv2d)):
        return _conv_twin(module, cls)
    if issubclass(cls, nn.MultiheadAttention):
        return cls(**mha_constructor_args(module), device="meta")
    if issubclass(cls, nn.RNNBase):
        extra = {"nonlinearity": module.nonlinearity} if cls in (nn.RNN, fnn.RNN) else {"proj_size": module.proj_size}
        return cls(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            device="meta",
            **extra,
        )
    extra = {"nonlinearity": module.nonlinearity} if issubclass(cls, nn.RNNCell) else {}
    return cls(module.input_size, module.hidden_size, bias=module.bias, device="meta", **extra)


class _Walk:
    """One convert or revert pass over a model: replacements, the memo of shared
    modules, and the report."""

    def __init__(self, verb: str, verbose: bool) -> None:
        self.verb, self.verbose = verb, verbose
        self.memo: dict[int, nn.Module] = {}

    def say(self, path: str, message: str) -> None:
        if self.verbose:
            print(f"fastlayers.{self.verb}: {path or '(model)'}: {message}")

    def refuse(self, path: str, module: nn.Module, reason: str) -> None:
        left = "left unconverted" if self.verb == "convert" else "left as is"
        message = f"{_type_name(module)} {left}: {reason}"
        warnings.warn(f"fastlayers.{self.verb}: {path or '(model)'}: {message}", stacklevel=2)
        self.say(path, message)

    def carried(self, module: nn.Module, cls: type, path: str) -> nn.Module | None:
        """A `cls` that has taken over `module`'s state, or None (said why)."""
        reason = _reparametrization(module)
        if reason is None:
            try:
                return _carry(module, _twin(module, cls))
            except _CannotCarry as error:
                reason = str(error)
        self.refuse(path, module, reason)
        return None

    def twin_of(self, module: nn.Module, cls: type, path: str, label: str | None = None) -> nn.Module:
        new = self.carried(module, cls, path)
        if new is None:
            return module
        self.say(path, f"{label or _type_name(module)} -> {_type_name(new)}")
        return new

    def walk(self, module: nn.Module, path: str) -> nn.Module:
        """`module` or its replacement, with every descendant replaced in place."""
        if id(module) in self.memo:
            return self.memo[id(module)]
        replacement = self.replace(module, path)
        self.memo[id(module)] = replacement
        if type(replacement) is nn.Sequential:
            self.sequential_runs(replacement, path)
        for name, child in list(replacement._modules.items()):
            if child is not None:
                replacement._modules[name] = self.walk(child, f"{path}.{name}" if path else name)
        return replacement


class _Convert(_Walk):
    def __init__(self, fuse: bool, verbose: bool) -> None:
        super().__init__("convert", verbose)
        self.fuse = fuse

    def replace(self, module: nn.Module, path: str) -> nn.Module:
        twin = _TWINS.get(type(module))
        if twin is not None:
            return self.twin_of(module, twin, path)
        base = type(module).__bases__[0]
        if parametrize.is_parametrized(module) and base in _TWINS:
            self.refuse(path, module, _reparametrization(module))
        elif isinstance(module, tuple(_TWINS)) and not isinstance(module, (*_TORCH_TWINS, *_FUSED)):
            self.say(path, f"{_type_name(module)} subclasses a torch.nn layer and may rely on it: left as is")
        return module

    def sequential_runs(self, seq: nn.Sequential, path: str) -> None:
        if not self.fuse:
            return
        items = list(seq._modules.items())
        i = 0
        while i < len(items):
            length = _fusable_run(items, i)
            if length:
                name, conv = items[i]
                block = fnn.Conv2dReLUMaxPool2d if length == 3 else fnn.Conv2dReLU
                names = [n for n, _ in items[i : i + length]]
                label = " + ".join(_type_name(m) for _, m in items[i : i + length])
                label += f" (then nn.Identity at {', '.join(names[1:])})"
                fused = self.twin_of(conv, block, f"{path}.{name}" if path else name, label=label)
                if fused is not conv:
                    seq._modules[name] = fused
                    for placeholder in names[1:]:
                        seq._modules[placeholder] = nn.Identity()
                    i += length
                    continue
            i += 1


def _is_plain(module: nn.Module, cls: type) -> bool:
    return type(module) is cls and not _has_hooks(module)


def _fusable_run(items: list, i: int) -> int:
    """3 for Conv2d, ReLU, MaxPool2d(2, 2) at items[i:], 2 for Conv2d, ReLU, else 0."""
    if not (
        i + 1 < len(items)
        and type(items[i][1]) in (nn.Conv2d, fnn.Conv2d)
        and not _has_hooks(items[i][1])
        and _is_plain(items[i + 1][1], nn.ReLU)
    ):
        return 0
    if i + 2 < len(items) and _is_plain(items[i + 2][1], nn.MaxPool2d):
        pool = items[i + 2][1]
        if (
            _pair(pool.kernel_size) == (2, 2)
            and _pair(pool.stride) == (2, 2)
            and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode
            and not pool.return_indices
        ):
            return 3
    return 2


class _Revert(_Walk):
    def __init__(self, model: nn.Module, verbose: bool) -> None:
        super().__init__("revert", verbose)
        # A fused block used at several places cannot take its placeholders' slots.
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def replace(self, module: nn.Module, path: str) -> nn.Module:
        if parametrize.is_parametrized(module) and type(module).__bases__[0] in (*_TORCH_TWINS, *_FUSED):
            self.refuse(path, module, _reparametrization(module))
            return module
        if type(module) in _TORCH_TWINS:
            return self.twin_of(module, _TORCH_TWINS[type(module)], path)
        if type(module) in _FUSED:
            # Not inside a Sequential with its placeholders (those are handled by
            # sequential_runs before the walk reaches the block).
            conv = self.carried(module, nn.Conv2d, path)
            if conv is None:
                return module
            layers = [conv, nn.ReLU()] + ([nn.MaxPool2d(2, 2)] if type(module) is fnn.Conv2dReLUMaxPool2d else [])
            wrapper = nn.Sequential(*layers).train(module.training)
            for name in _HOOK_STATE:  # the hooks saw the block's output: the wrapper's
                conv_hooks, wrapper_hooks = getattr(conv, name), getattr(wrapper, name)
                object.__setattr__(wrapper, name, conv_hooks)
                object.__setattr__(conv, name, wrapper_hooks)
            self.say(path, f"{_type_name(module)} -> torch.nn.Sequential({', '.join(_type_name(m) for m in layers)})")
            return wrapper
        if isinstance(module, fnn.LuongAttention):
            self.say(path, "fastlayers.nn.LuongAttention has no torch.nn twin: left as is")
        return module

    def sequential_runs(self, seq: nn.Sequential, path: str) -> None:
        items = list(seq._modules.items())
        for i, (name, block) in enumerate(items):
            if type(block) not in _FUSED or _has_hooks(block) or self.uses[id(block)] > 1:
                continue
            tail = [nn.ReLU()] + ([nn.MaxPool2d(2, 2)] if type(block) is fnn.Conv2dReLUMaxPool2d else [])
            following = items[i + 1 : i + 1 + len(tail)]
            if len(following) == len(tail) and all(_is_plain(m, nn.Identity) for _, m in following):
                try:
                    conv = _carry(block, _conv_twin(block, nn.Conv2d))
                except _CannotCarry:
                    continue  # the walk reaches the block next and says why it stays
                seq._modules[name] = conv
                for (placeholder, _), layer in zip(following, tail):
                    seq._modules[placeholder] = layer
                names = ", ".join(_type_name(m) for m in [conv, *tail])
                self.say(f"{path}.{name}" if path else name, f"{_type_name(block)} (+ placeholders) -> {names}")


def convert(model: nn.Module, fuse: bool = False, verbose: bool = False) -> nn.Module:
    """Replace every torch.nn Conv1d/Conv2d/LSTM/LSTMCell/RNN/RNNCell/MultiheadAttention
    in `model` by its fastlayers twin, in place; returns the model (a new module only
    when `model` itself is one of those layers). See the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlayers.convert expects a torch.nn.Module, got {type(model)}")
    return _Convert(fuse, verbose).walk(model, "")


def revert(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Replace every fastlayers layer in `model` (fused blocks included) by its torch.nn
    twin with the same parameters, in place; returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlayers.revert expects a torch.nn.Module, got {type(model)}")
    return _Revert(model, verbose).walk(model, "")
