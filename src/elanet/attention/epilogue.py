"""The attention branch's output ``x + DropPath(act(BN(a)))`` (paper eq. 5 for MRLA-B / ELA with ReLU,
eq. 7 for MRLA-L without), fused into one pass each way on CPU.

On this memory-bound CPU the three operators cost more than the retrieval they follow: eager
PyTorch reads and writes a value-sized tensor about nine times forward and ten times backward for
BatchNorm's statistics and normalisation, the in-place ReLU and DropPath's multiply-add. The native
kernel (``kernels/epilogue.c``) reads ``a`` once for the statistics and once with ``x`` to write the
output; backward reads the gradient and ``a`` once for BatchNorm's two reductions and once more to
write ``a``'s gradient.

:func:`branch_add` takes the fused path when training on CPU in float32 with channels-last
tensors and the kernel is available, and the PyTorch operators otherwise (NCHW, inference and
export, ``torch.compile``, autocast, CUDA). The two paths compute the same function, including the
running-statistics update and DropPath's random draw, to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..kernels import epilogue_lib

__all__ = ["branch_add", "fused_epilogue_ok", "gated_branch_add"]


def _geometry(a: Tensor) -> tuple[int, ...] | None:
    """``(B, G, R, d, sb, sg, sr)`` of the kernel's view of a channels-last ``a`` (see epilogue.c), else None."""
    if a.ndim == 4 and a.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = a.shape
        return b, 1, h * w, c, a.stride(0), 0, c
    return None


def fused_epilogue_ok(x: Tensor, bn: nn.Module, *others: Tensor) -> bool:
    """Whether the fused kernels apply to block output ``x`` (and ``others``, same shape) with branch norm ``bn``."""
    return (
        type(bn) is nn.BatchNorm2d and bn.training and bn.affine
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.ndim == 4 and t.shape == x.shape
                and t.is_contiguous(memory_format=torch.channels_last) for t in (x, *others))
        and bn.weight.dtype == torch.float32
        and not torch.compiler.is_compiling() and not torch.jit.is_scripting() and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")
        and epilogue_lib() is not None
    )


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _batch_stats(sums: Tensor, n: int, weight: Tensor, bias: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, ...]:
    """Mean, invstd, and the float32 per-channel ``scale, shift`` of BN from the kernel's double sums;
    updates ``bn``'s running statistics as ``nn.BatchNorm2d`` does (momentum, or a cumulative average)."""
    mean = sums[0] / n
    var = (sums[1] / n - mean * mean).clamp_(min=0.0)
    invstd = (var + bn.eps).rsqrt_()
    scale64 = weight.detach().double() * invstd
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), alpha=m)
    return mean, invstd, scale64.float(), (bias.detach().double() - mean * scale64).float()


def _bn_backward_coefficients(sums: Tensor, n: int, weight: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``c1, c2, c3`` with ``grad_a = c1 * gy + c2 * (a - mean) + c3``, BN's backward from ``sum gy`` and ``sum gy (a - mean)``."""
    k1 = weight.detach().double() * invstd
    return k1.float(), (-k1 * invstd * invstd * sums[1] / n).float(), (-k1 * sums[0] / n).float()


def _stats(a: Tensor) -> Tensor:
    """BN's batch sums of a channels-last ``a``: ``[2, C]`` double, sum and sum of squares per channel."""
    geom = _geometry(a)
    sums = torch.empty(2, geom[1] * geom[3], dtype=torch.float64)
    if epilogue_lib().elanet_epi_stats(_ptr(a), *geom, _ptr(sums[0]), _ptr(sums[1])):
        raise MemoryError("the fused BatchNorm could not allocate its per-thread sums")
    return sums


def _normalise_add(a: Tensor, x: Tensor, sums: Tensor, weight: Tensor, bias: Tensor, bn: nn.BatchNorm2d,
                   keep: Tensor | None, relu: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``x + keep * act(BN_train(a))`` from ``a``'s batch ``sums`` (updating BN's running statistics), and
    the statistics ``(scale, shift, mean, invstd, weight)`` that :func:`_backward_sums` takes."""
    geom = _geometry(a)
    mean, invstd, scale, shift = _batch_stats(sums, geom[0] * geom[2], weight, bias, bn)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    epilogue_lib().elanet_epi_forward(_ptr(a), *geom, _ptr(x), _ptr(scale), _ptr(shift), _ptr(keep), int(relu), _ptr(out))
    return out, (scale, shift, mean.float(), invstd, weight)


def _backward_sums(a: Tensor, grad: Tensor, stats: tuple[Tensor, ...], keep: Tensor | None, relu: bool) -> Tensor:
    """BN's two backward reductions ``[sum gy, sum gy (a - mean)]`` (``[2, C]`` double), gy the gradient
    through DropPath and the activation."""
    scale, shift, mean = stats[:3]
    geom = _geometry(a)
    sums = torch.empty(2, geom[1] * geom[3], dtype=torch.float64)
    if epilogue_lib().elanet_epi_backward_sums(_ptr(a), *geom, _ptr(grad), _ptr(scale), _ptr(shift), _ptr(mean), _ptr(keep),
                                               int(relu), _ptr(sums[0]), _ptr(sums[1])):
        raise MemoryError("the fused BatchNorm could not allocate its per-thread sums")
    return sums


class _Epilogue(torch.autograd.Function):
    """``x + keep * act(BN_train(a))`` with BN's running statistics updated as ``nn.BatchNorm2d`` does."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, weight: Tensor, bias: Tensor, bn: nn.BatchNorm2d, keep: Tensor | None,  # type: ignore[override]
                relu: bool) -> Tensor:
        out, ctx.stats = _normalise_add(a, x, _stats(a), weight, bias, bn, keep, relu)
        ctx.save_for_backward(a, keep)
        ctx.relu = relu
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, keep = ctx.saved_tensors
        scale, shift, mean, invstd, weight = ctx.stats
        geom = _geometry(a)
        grad = grad.contiguous(memory_format=torch.channels_last)
        sums = _backward_sums(a, grad, ctx.stats, keep, ctx.relu)
        grad_a = None
        if ctx.needs_input_grad[0]:  # BN backward: w*invstd * (gy - mean(gy) - xhat * mean(gy * xhat))
            c1, c2, c3 = _bn_backward_coefficients(sums, geom[0] * geom[2], weight, invstd)
            grad_a = torch.empty_like(a)
            epilogue_lib().elanet_epi_backward(_ptr(a), *geom, _ptr(grad), _ptr(scale), _ptr(shift), _ptr(mean), _ptr(keep),
                                               int(ctx.relu), _ptr(c1), _ptr(c2), _ptr(c3), _ptr(grad_a))
        grad_w = (sums[1] * invstd).float() if ctx.needs_input_grad[2] else None
        grad_b = sums[0].float() if ctx.needs_input_grad[3] else None
        return grad_a, grad if ctx.needs_input_grad[1] else None, grad_w, grad_b, None, None, None


class _GatedEpilogue(torch.autograd.Function):
    """MRLA-L's ``x + keep * BN_train(gate * v + lam * identity)`` (paper eq. 7); the mix is never written out."""

    @staticmethod
    def forward(ctx, v: Tensor, gate: Tensor, identity: Tensor, lam: Tensor, x: Tensor, weight: Tensor, bias: Tensor,  # type: ignore[override]
                bn: nn.BatchNorm2d, keep: Tensor | None) -> Tensor:
        lib = epilogue_lib()
        b, c, h, w = x.shape
        n = b * h * w
        gate2 = gate.reshape(b, c).contiguous()
        lam1 = lam.reshape(c).contiguous()
        dims = (b, h * w, c)
        sums = torch.empty(2, c, dtype=torch.float64)
        if lib.elanet_mix_stats(_ptr(v), _ptr(identity), _ptr(gate2), _ptr(lam1), *dims, _ptr(sums[0]), _ptr(sums[1])):
            raise MemoryError("the fused BatchNorm could not allocate its per-thread sums")
        mean, invstd, scale, shift = _batch_stats(sums, n, weight, bias, bn)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        lib.elanet_mix_forward(_ptr(v), _ptr(identity), _ptr(gate2), _ptr(lam1), *dims, _ptr(x), _ptr(scale), _ptr(shift), _ptr(keep), _ptr(out))
        ctx.save_for_backward(v, identity, gate2, lam1, keep)
        ctx.stats, ctx.dims, ctx.n, ctx.gate_shape, ctx.lam_shape = (mean.float(), invstd, weight), dims, n, gate.shape, lam.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, identity, gate2, lam1, keep = ctx.saved_tensors
        mean, invstd, weight = ctx.stats
        dims, n = ctx.dims, ctx.n
        lib = epilogue_lib()
        grad = grad.contiguous(memory_format=torch.channels_last)
        sums = torch.empty(2, dims[2], dtype=torch.float64)
        args = (_ptr(v), _ptr(identity), _ptr(gate2), _ptr(lam1), *dims)
        if lib.elanet_mix_backward_sums(*args, _ptr(grad), _ptr(mean), _ptr(keep), _ptr(sums[0]), _ptr(sums[1])):
            raise MemoryError("the fused BatchNorm could not allocate its per-thread sums")
        c1, c2, c3 = _bn_backward_coefficients(sums, n, weight, invstd)
        grad_v, grad_id = torch.empty_like(v), torch.empty_like(identity)
        grad_gate = torch.empty(dims[0], dims[2], dtype=torch.float64)
        grad_lam = torch.empty(dims[2], dtype=torch.float64)
        if lib.elanet_mix_backward(*args, _ptr(grad), _ptr(mean), _ptr(keep), _ptr(c1), _ptr(c2), _ptr(c3),
                                   _ptr(grad_v), _ptr(grad_id), _ptr(grad_gate), _ptr(grad_lam)):
            raise MemoryError("the fused BatchNorm could not allocate its per-thread sums")
        need = ctx.needs_input_grad
        return (grad_v if need[0] else None, grad_gate.float().view(ctx.gate_shape) if need[1] else None,
                grad_id if need[2] else None, grad_lam.float().view(ctx.lam_shape) if need[3] else None,
                grad if need[4] else None, (sums[1] * invstd).float() if need[5] else None, sums[0].float() if need[6] else None,
                None, None)


def gated_branch_add(x: Tensor, v: Tensor, gate: Tensor, identity: Tensor, lam: Tensor, bn: nn.BatchNorm2d,
                     drop_path: nn.Module) -> Tensor:
    """MRLA-L's ``x + drop_path(bn(gate * v + lam * identity))`` (paper eq. 7) with the fused kernels.

    Only where ``fused_epilogue_ok(x, bn, v, identity)`` holds; ``gate`` is ``[B, C, 1, 1]``, ``lam`` ``[1, C, 1, 1]``.
    """
    keep = drop_path.sample_scale(x)
    return _GatedEpilogue.apply(v, gate, identity, lam, x, bn.weight, bn.bias, bn, None if keep is None else keep.view(-1))


def branch_add(x: Tensor, a: Tensor, bn: nn.BatchNorm2d, drop_path: nn.Module, *, relu: bool) -> Tensor:
    """``x + drop_path(act(bn(a)))``, act = ReLU if ``relu`` else identity.

    Args:
        x: the block output ``[B, C, H, W]`` the branch is added to.
        a: the branch before its norm, ``[B, C, H, W]``.
        bn: the branch's ``BatchNorm2d``.
        drop_path: the branch's :class:`~elanet.attention.mrla.DropPath`.
    """
    if _geometry(a) is not None and fused_epilogue_ok(x, bn):
        keep = drop_path.sample_scale(x)
        return _Epilogue.apply(a, x, bn.weight, bn.bias, bn, None if keep is None else keep.view(-1), relu)
    y = bn(a)
    return drop_path.add(x, F.relu(y, inplace=True) if relu else y)
