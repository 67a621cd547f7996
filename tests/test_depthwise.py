"""The native value convolution + descriptor pooling (kernels/depthwise.c) against float64 references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elanet.attention.depthwise import _native_ok, value_and_descriptor

from conftest import CAN_BUILD

needs_cc = pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")


def _reference(x: torch.Tensor, weight: torch.Tensor, gv, gy, gres):
    """float64 gradients of <gv, DWConv(x)> + <gy, GAP(x)> + <gres, x> with respect to x and the weight."""
    xd, wd = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    v, y = F.conv2d(xd, wd, padding=1, groups=x.shape[1]), xd.mean((2, 3))
    loss = (v * gv.double()).sum() + (y * gy.double()).sum() + (xd * gres.double()).sum()
    return (v, y, *torch.autograd.grad(loss, (xd, wd)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@needs_cc
@pytest.mark.parametrize("shape", [(3, 16, 5, 7), (2, 8, 1, 1), (4, 24, 1, 6), (2, 32, 6, 1), (2, 64, 9, 9)])
def test_value_and_descriptor_matches_float64(use_kernels, shape):
    """Value, descriptor and the gradients of x (with the residual's share summed in) and of the
    weight, across edge cases of the zero padding (one row, one column)."""
    use_kernels(True)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv = nn.Conv2d(shape[1], shape[1], 3, padding=1, groups=shape[1], bias=False)
    assert _native_ok(x, conv)
    v, y, x_out = value_and_descriptor(x, conv)
    assert type(v.grad_fn).__name__ == "_ValuePoolBackward" and torch.equal(x_out, x)
    assert v.is_contiguous(memory_format=torch.channels_last)
    gv, gy, gres = torch.randn_like(v), torch.randn_like(y), torch.randn_like(v)
    gx, gw = torch.autograd.grad((v * gv).sum() + (y * gy).sum() + (x_out * gres).sum(), (x, conv.weight))
    rv, ry, rgx, rgw = _reference(x, conv.weight, gv, gy, gres)
    for got, want in ((v, rv), (y, ry), (gx, rgx), (gw, rgw)):
        assert _rel(got, want) < 1e-6
    assert gx.is_contiguous(memory_format=torch.channels_last)


@needs_cc
def test_value_gradient_does_not_depend_much_on_threads(use_kernels):
    """Per-thread weight-gradient sums merged in thread order: 1 and 2 threads agree to float rounding,
    and the same thread count gives the same bits."""
    use_kernels(True)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    grads = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            v, y, _ = value_and_descriptor(x, conv)
            grads.setdefault(n, []).append(torch.autograd.grad(v.square().sum() + y.sum(), (x, conv.weight)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*grads[2]))
    for a, b in zip(grads[1][0], grads[2][0]):
        assert _rel(a, b.double()) < 1e-6


@pytest.mark.parametrize("case", ["nchw", "channels_not_multiple_of_8", "hooked", "no_grad", "strided"])
def test_pytorch_path_where_the_kernel_does_not_apply(case):
    """Elsewhere ``value_and_descriptor`` is ``conv_v(x)`` and the mean, and ``conv_v``'s hooks still run."""
    c = 12 if case == "channels_not_multiple_of_8" else 16
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False, stride=2 if case == "strided" else 1)
    x = torch.randn(2, c, 6, 6, requires_grad=True)
    if case != "nchw":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    seen = []
    if case == "hooked":
        conv.register_forward_hook(lambda *_: seen.append(1))
    with torch.set_grad_enabled(case != "no_grad"):
        assert not _native_ok(x, conv)
        v, y, x_out = value_and_descriptor(x, conv)
    assert seen == ([1] if case == "hooked" else [])
    assert x_out is x
    assert torch.allclose(v, conv(x)) and torch.allclose(y, x.mean((2, 3)), atol=1e-6)

# Whole models with the kernels on against float64: test_epilogue.py::test_model_step_fused_equals_pytorch_ops.
