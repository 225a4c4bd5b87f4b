"""register_autograd: ``torch.library.register_autograd``'s contract at a lower per-call cost.

torch's generated autograd kernel refills the arguments the dispatcher dropped for
being equal to their defaults with ``torch._library.utils.fill_defaults``, which reads
``schema.arguments`` (a list of new Python objects built on every access) twice per
argument: ~31 us a call for the 10 arguments of ``fastlayers::lstm_layer``, ~4% of the
seed LSTM's train step (measured on this project's CPU machine). Here the defaults are
read from the schema once, at registration. Everything else is as torch does it: one
``torch.autograd.Function`` per op whose forward runs the op below autograd and calls
``setup_context(ctx, inputs, output)`` with every schema argument, and whose backward
returns one gradient per argument the op was called with (``None`` for the rest).
Only functional schemas without keyword-only arguments are supported (all of ours).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def register_autograd(qualname: str, backward: Callable, *, setup_context: Callable) -> None:
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    arguments = op._schema.arguments
    if any(argument.kwarg_only for argument in arguments):
        raise NotImplementedError(f"{qualname}: keyword-only arguments are not supported")
    defaults = tuple(argument.default_value if argument.has_default_value() else None for argument in arguments)

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        ctx.num_args = len(args)
        setup_context(ctx, args + defaults[len(args) :], output)
        return output

    def backward_of_call(ctx, *grads):
        grads_in = backward(ctx, *grads)
        if not isinstance(grads_in, tuple):
            grads_in = (grads_in,)
        if len(grads_in) != len(defaults):
            raise RuntimeError(
                f"the backward of {qualname} returned {len(grads_in)} gradients, expected {len(defaults)}"
            )
        if any(grad is not None for grad in grads_in[ctx.num_args :]):
            raise RuntimeError(f"the backward of {qualname} returned a gradient for an argument it was not given")
        return grads_in[: ctx.num_args]

    function = type(
        f"{namespace}_{name}_autograd",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_of_call)},
    )

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    library = torch.library.Library(namespace, "FRAGMENT")
    library.impl(name, autograd_kernel, "Autograd")
    _libraries.append(library)


_libraries: list[torch.library.Library] = []  # a Library's registrations end when it is collected
