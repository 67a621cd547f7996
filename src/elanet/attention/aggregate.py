"""Retrieval over the layers of a stage: the per-forward key/value memory and its aggregation.

The aggregation o_t = sum_s alpha_{t,s} v_s (paper eq. 5) is one batched matrix product over the
stacked values of the active layers. A custom autograd function keeps the stacked copy out of the
autograd graph: only the per-layer values (alive anyway, later blocks read them) are saved, so the
memory of a stage grows with the number of layers, not with its square.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LayerMemory", "aggregate"]


class LayerMemory:
    """Keys and values of the active layer-attention blocks of one stage, for one forward pass.

    A stage creates a fresh memory for every forward, so nothing leaks across batches; a pruned
    block never writes to it, which removes it from the key/value set of every later block
    (paper eq. 16).
    """

    __slots__ = ("keys", "values")

    def __init__(self) -> None:
        self.keys: list[Tensor] = []  # each [B, heads, d]
        self.values: list[Tensor] = []  # each [B, C, H, W]

    def __len__(self) -> int:
        return len(self.values)


def _stack_heads(values: tuple[Tensor, ...], heads: int) -> Tensor:
    b = values[0].shape[0]
    return torch.stack([v.reshape(b, heads, -1) for v in values], dim=2)  # [B, heads, n, d*H*W]


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: Tensor, *values: Tensor) -> Tensor:  # type: ignore[override]
        heads = weights.shape[1]
        stacked = _stack_heads(values, heads)
        out = torch.matmul(weights.unsqueeze(2).to(stacked.dtype), stacked)  # [B, heads, 1, d*H*W]
        ctx.save_for_backward(weights, *values)
        return out.reshape(values[-1].shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weights, *values = ctx.saved_tensors
        b, heads, n = weights.shape
        g = grad.reshape(b, heads, 1, -1)
        grad_w = grad_v = None
        if ctx.needs_input_grad[0]:
            stacked = _stack_heads(tuple(values), heads)
            grad_w = torch.matmul(g, stacked.transpose(-1, -2)).squeeze(2).to(weights.dtype)
        if any(ctx.needs_input_grad[1:]):
            gv = weights.unsqueeze(-1).to(g.dtype) * g  # [B, heads, n, d*H*W]
            grad_v = [gv[:, :, s].reshape(values[s].shape) for s in range(n)]
        else:
            grad_v = [None] * n
        return (grad_w, *grad_v)


def aggregate(weights: Tensor, values: list[Tensor]) -> Tensor:
    """Attention-weighted sum of the stage's values, per head (paper eq. 5).

    Args:
        weights: attention distribution ``[B, heads, n]`` over the ``n`` layers in ``values``.
        values: ``n`` tensors ``[B, C, H, W]``; channels split contiguously into ``heads`` groups.

    Returns:
        ``[B, C, H, W]``: for head h, ``sum_s weights[:, h, s] * values[s][:, h-th channel group]``.
    """
    if weights.shape[-1] != len(values):
        raise ValueError(f"got {weights.shape[-1]} attention weights for {len(values)} values")
    return _Aggregate.apply(weights, *values)
