"""fastlayers.ops.autograd.register_autograd keeps torch.library.register_autograd's
contract: setup_context sees every schema argument (those the dispatcher dropped for
equalling their defaults put back), the backward's gradients are checked against the
arguments, and calls that need no gradient never build a graph."""

from __future__ import annotations

import pytest
import torch

from fastlayers.ops.autograd import register_autograd

_LIBRARY = torch.library.Library("fastlayers_test_autograd", "DEF")
_LIBRARY.define("scale(Tensor x, float factor=2.0, str mode='plain') -> Tensor")
_LIBRARY.define("scale_bad(Tensor x, float factor=2.0) -> Tensor")
_LIBRARY.impl("scale", lambda x, factor=2.0, mode="plain": x * factor, "CompositeExplicitAutograd")
_LIBRARY.impl("scale_bad", lambda x, factor=2.0: x * factor, "CompositeExplicitAutograd")
_SEEN = []


def _setup_context(ctx, inputs, output):
    _SEEN.append(inputs[1:])
    ctx.factor = inputs[1]


register_autograd(
    "fastlayers_test_autograd::scale",
    lambda ctx, grad: (grad * ctx.factor, None, None),
    setup_context=_setup_context,
)
register_autograd(
    "fastlayers_test_autograd::scale_bad",
    lambda ctx, grad: (grad * ctx.factor,),  # one gradient for two arguments
    setup_context=_setup_context,
)


@pytest.mark.parametrize(
    "args, expected",
    [((), (2.0, "plain")), ((3.0,), (3.0, "plain")), ((2.0, "plain"), (2.0, "plain")), ((5.0, "x"), (5.0, "x"))],
)
def test_setup_context_sees_every_argument_with_defaults_filled_in(args, expected):
    x = torch.randn(4, requires_grad=True)
    _SEEN.clear()
    y = torch.ops.fastlayers_test_autograd.scale.default(x, *args)
    assert _SEEN == [expected]
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, expected[0]))


def test_no_graph_without_a_gradient_to_compute():
    x = torch.randn(4, requires_grad=True)
    _SEEN.clear()
    with torch.no_grad():
        assert torch.ops.fastlayers_test_autograd.scale.default(x).grad_fn is None
    assert torch.ops.fastlayers_test_autograd.scale.default(x.detach()).grad_fn is None
    assert _SEEN == []


def test_backward_with_the_wrong_number_of_gradients_raises():
    x = torch.randn(4, requires_grad=True)
    y = torch.ops.fastlayers_test_autograd.scale_bad.default(x, 3.0)
    with pytest.raises(RuntimeError, match="returned 1 gradients, expected 2"):
        y.sum().backward()


def test_keyword_only_arguments_are_refused():
    library = torch.library.Library("fastlayers_test_autograd_kw", "DEF")
    library.define("op(Tensor x, *, float factor=1.0) -> Tensor")
    with pytest.raises(NotImplementedError, match="keyword-only"):
        register_autograd("fastlayers_test_autograd_kw::op", lambda ctx, grad: grad, setup_context=_setup_context)


def test_opcheck_passes_for_an_op_registered_this_way():
    x = torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlayers_test_autograd.scale.default, (x, 1.5, "plain"))
