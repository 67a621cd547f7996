"""The value convolution and the descriptor's pooling of layer attention in one pass each way (CPU).

Every MRLA block reads its input ``x`` twice before the retrieval: the depthwise 3x3 value
``v = DWConv(x)`` and the global average pool ``y = GAP(x)`` that the query and key come from
(paper eq. 4; SPEC §2). In training, autograd then adds three gradients into ``x``'s (the
residual's, the value convolution's and the pool's broadcast one), and oneDNN's depthwise backward
moves about three times the data it must at a CIFAR ResNet's channel counts. The native kernel
(``kernels/depthwise.c``) reads ``x`` once forward and writes ``v`` and the pooled sums; backward
reads ``v``'s gradient and ``x`` once and writes ``x``'s gradient with the pool's share already in
it, and the weight's gradient.

:func:`value_and_descriptor` takes the native path when training on CPU in float32 with
channels-last tensors, and ``conv_v(x)`` with ``x.mean`` otherwise; the two compute the same
function to float rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module

from ..kernels import epilogue_lib

__all__ = ["value_and_descriptor"]


def _native_ok(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether the native kernel applies: eager float32 channels-last CPU training of a plain 3x3
    depthwise conv (no hooks on it, which the native path would bypass), kernels built."""
    w = conv.weight
    return (
        torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
        and x.ndim == 4 and x.shape[1] % 8 == 0 and x.is_contiguous(memory_format=torch.channels_last)
        and type(conv) is nn.Conv2d and conv.bias is None and conv.groups == x.shape[1] == w.shape[0]
        and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
        and not (conv._forward_hooks or conv._forward_pre_hooks or _module._global_forward_hooks
                 or _module._global_forward_pre_hooks)
        and not torch.compiler.is_compiling() and not torch.jit.is_scripting() and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")
        and epilogue_lib() is not None
    )


class _ValuePool(torch.autograd.Function):
    """``(DWConv3x3(x), sum_{h,w} x, x)`` for channels-last float32 ``x`` in the native kernels.

    The third output is ``x`` itself (a view), for the branch's residual add: its gradient comes back
    here, so the kernel adds it into ``x``'s gradient in the same pass instead of autograd summing
    the two whole tensors afterwards.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        b, c, h, w = x.shape
        w9 = weight.detach().reshape(c, 9).t().contiguous()  # tap-major [9, C]
        v = torch.empty_like(x, memory_format=torch.channels_last)
        rowsum = torch.empty((b, h, c), dtype=torch.float64)
        if epilogue_lib().elanet_dw_forward(x.data_ptr(), b, h, w, c, w9.data_ptr(), None, 0, v.data_ptr(), rowsum.data_ptr()):
            raise MemoryError("the native value convolution could not allocate its zero row")
        ctx.save_for_backward(x)
        ctx.w9, ctx.weight_shape = w9, weight.shape
        ctx.set_materialize_grads(False)
        return v, rowsum.sum(1).to(x.dtype), x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v: Tensor | None, grad_sum: Tensor | None, grad_res: Tensor | None):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad
        if grad_v is None:  # the value was not used: x's gradient is the others' sum
            parts = [g for g in (grad_res, None if grad_sum is None else grad_sum[:, :, None, None]) if g is not None]
            grad_x = (parts[0] if len(parts) == 1 else parts[0] + parts[1]).expand_as(x) if need_x and parts else None
            return grad_x, None
        b, c, h, w = x.shape
        g = grad_v.contiguous(memory_format=torch.channels_last)
        gy = grad_sum.contiguous() if grad_sum is not None else None
        res = grad_res.contiguous(memory_format=torch.channels_last) if grad_res is not None and need_x else None
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
        grad_w9 = torch.empty((9, c), dtype=torch.float64) if need_w else None
        if epilogue_lib().elanet_dw_backward(
                x.data_ptr(), g.data_ptr(), b, h, w, c, ctx.w9.data_ptr(), None if gy is None else gy.data_ptr(),
                None if res is None else res.data_ptr(), None if grad_x is None else grad_x.data_ptr(),
                None if grad_w9 is None else grad_w9.data_ptr()):
            raise MemoryError("the native value convolution could not allocate its per-thread sums")
        grad_w = grad_w9.t().reshape(ctx.weight_shape).to(x.dtype) if need_w else None
        return grad_x, grad_w


def value_and_descriptor(x: Tensor, conv_v: nn.Conv2d) -> tuple[Tensor, Tensor, Tensor]:
    """The value ``conv_v(x)`` ``[B, C, H, W]``, the descriptor ``GAP(x)`` ``[B, C]`` (paper eq. 4), and
    ``x`` for the branch's residual add.

    One pass over ``x`` each way in the native kernel where it applies (float32 channels-last CPU
    training); ``conv_v(x)`` and a mean otherwise. Use the returned ``x`` (the same values) for
    every other use of ``x`` in the block, so that the kernel can sum its gradients.
    """
    h, w = x.shape[-2:]
    if _native_ok(x, conv_v):
        v, sums, x = _ValuePool.apply(x, conv_v.weight)
        return v, sums * (1.0 / (h * w)), x
    # the global average as a sum times 1/(H*W): its backward broadcasts instead of writing a full-size tensor
    return conv_v(x), x.sum((2, 3)) * (1.0 / (h * w)), x
