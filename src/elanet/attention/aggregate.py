"""Retrieval over the layers of a stage: the per-forward key/value memory and its aggregation.

The aggregation o_t = sum_s alpha_{t,s} v_s (paper eq. 5) is one batched matrix product per block.
A stage keeps the values of its active blocks in one buffer ``[layers, B, C*H*W]``; block t reads
its t values through a strided view, so it copies nothing and its cost grows with the number of
active layers it reads. Backward mirrors this: every block adds its share of the earlier values'
gradients into a matching gradient buffer with one broadcast multiply-add, and a value receives its
complete gradient when the backward pass reaches its own block. Only the buffer and the attention
weights are kept for backward, so the memory of a stage grows with its number of active layers.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["LayerMemory", "aggregate"]


class _Values:
    """A stage's values in one buffer, and their gradient partial sums during backward.

    Shared by the memory and the backward of every retrieval; it holds no autograd outputs, so
    no reference cycle runs through the graph.
    """

    __slots__ = ("capacity", "buf", "shape", "len", "grad", "grad_len", "grad_task")

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.buf: Tensor | None = None  # [capacity, B, C*H*W]: slot s holds the s-th value
        self.shape: torch.Size | None = None
        self.len = 0
        self.grad: Tensor | None = None  # [n, B*heads, d*H*W] partial sums, during one backward pass
        self.grad_len = 0  # slots of ``grad`` holding partial sums
        self.grad_task = -1  # the backward pass ``grad`` belongs to

    def store(self, value: Tensor) -> None:
        if self.capacity == 1 and self.len == 0:  # the stage's only value: no later block reads it, keep nothing
            self.shape, self.len = value.shape, 1
            return
        if self.capacity is not None and self.len >= self.capacity:
            raise ValueError(f"the memory holds at most {self.capacity} values (its capacity); pass capacity=None to let it grow")
        if self.buf is None:
            self.shape = value.shape
            self.buf = value.new_empty((max(self.capacity or 1, 1), value.shape[0], value[0].numel()))
        elif self.len == self.buf.shape[0]:  # over capacity: double, copying the earlier slots
            grown = self.buf.new_empty((2 * self.len, *self.buf.shape[1:]))
            grown[: self.len].copy_(self.buf)
            self.buf = grown
        self.buf[self.len].view(self.shape).copy_(value)
        self.len += 1


def _per_head(buf: Tensor, n: int, groups: int) -> Tensor:
    """Slots ``[0, n)`` of a ``[slots, B, C*H*W]`` buffer as ``[B*heads, n, d*H*W]`` (a view, no copy)."""
    return buf[:n].view(n, groups, -1).transpose(0, 1)


class LayerMemory:
    """Keys and values of the active layer-attention blocks of one stage, for one forward pass.

    A stage creates a fresh memory for every forward, so nothing leaks across batches; a pruned
    block never writes to it, which removes it from the key/value set of every later block
    (paper eq. 16). Blocks add their value and read the aggregation with :meth:`retrieve`.

    Args:
        capacity: how many values the stage will store (its active blocks); the value buffer is
            allocated once at that size, and storing more raises ``ValueError``. Without it the
            buffer starts small and doubles as needed.
    """

    __slots__ = ("keys", "_values", "_link", "_traced")

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.keys: list[Tensor] = []  # each [B, heads, d]
        self._values = _Values(capacity)
        self._link: Tensor | None = None  # orders the backward of consecutive retrievals
        self._traced: list[Tensor] = []  # values stored under torch.compile (see retrieve)

    def __len__(self) -> int:
        return self._values.len + len(self._traced)

    @property
    def values(self) -> list[Tensor]:
        """The stored values ``[B, C, H, W]``, oldest first (views of the stage's buffer).

        Empty for a memory of capacity 1: the only value of a stage is read once and not kept.
        """
        v = self._values
        return [v.buf[s].view(v.shape) for s in range(v.len)] if v.buf is not None else []

    def retrieve(self, weights: Tensor, value: Tensor) -> Tensor:
        """Store ``value`` as the newest layer, then aggregate all stored values (paper eq. 5).

        Args:
            weights: attention ``[B, heads, n]`` over the ``n = len(self) + 1`` layers, newest last: a
                softmax over the layers. With one layer it is constantly 1, so no gradient reaches it.
            value: ``[B, C, H, W]`` value of the current layer; channels split contiguously into heads.

        Returns:
            ``[B, C, H, W]``: for head h, ``sum_s weights[:, h, s] * v_s[:, h-th channel group]``.
        """
        if weights.shape[-1] != len(self) + 1:
            raise ValueError(f"got {weights.shape[-1]} attention weights for {len(self) + 1} values (stored + new)")
        if weights.shape[0] != value.shape[0] or value.shape[1] % weights.shape[1]:
            raise ValueError(f"weights {tuple(weights.shape)} do not fit a value of shape {tuple(value.shape)}")
        if self._values.shape is not None and value.shape != self._values.shape:
            raise ValueError(f"value shape {tuple(value.shape)} differs from the stage's {tuple(self._values.shape)}")
        if not torch.is_grad_enabled():
            return self._retrieve_inference(weights, value)
        if torch.compiler.is_compiling():
            # torch.compile: the same sum in plain differentiable ops, which the compiler traces and
            # differentiates itself (the custom autograd below keeps Python state between blocks)
            self._traced.append(value)
            return aggregate(weights, self._traced)
        link = self._link if self._link is not None else weights.new_empty(0)
        out, self._link = _Retrieve.apply(weights, value, link, self._values)
        return out

    # --- inference path: no autograd, plain tensor ops, so torch.export / ONNX can trace it -------------
    def _retrieve_inference(self, weights: Tensor, value: Tensor) -> Tensor:
        """The forward of :meth:`retrieve` without the custom autograd (used when grad is disabled)."""
        v = self._values
        if v.len == 0 and weights.shape[-1] == 1:  # a softmax over one layer is exactly 1: o_1 = v_1
            v.store(value)
            return value
        v.store(value)
        b, heads, n = weights.shape
        stacked = _per_head(v.buf, n, b * heads)  # [B*heads, n, d*H*W], a view of the stage's buffer
        return torch.bmm(weights.reshape(b * heads, 1, n).to(stacked.dtype), stacked).view(value.shape)


class _Retrieve(torch.autograd.Function):
    """Store the newest value in the stage's buffer and aggregate the first n slots.

    Autograd sees only (weights, newest value, link): the gradients of the earlier values are
    accumulated in ``values.grad`` and returned by their own block's backward. ``link`` is an
    empty tensor produced by the previous retrieval of the stage; consuming it makes that
    retrieval's backward wait for this one, so a value's gradient is complete when handed out.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, value: Tensor, link: Tensor, values: _Values):  # type: ignore[override]
        values.store(value)
        b, heads, n = weights.shape
        ctx.values, ctx.n = values, n
        ctx.save_for_backward(weights)
        stacked = _per_head(values.buf if values.buf is not None else value.reshape(1, b, -1), n, b * heads)
        out = torch.bmm(weights.reshape(b * heads, 1, n).to(stacked.dtype), stacked)  # [B*heads, 1, d*H*W]
        return out.view(value.shape), link.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, _grad_link: Tensor):  # type: ignore[override]
        values, n = ctx.values, ctx.n
        (weights,) = ctx.saved_tensors
        b, heads, _ = weights.shape
        g = grad.reshape(b * heads, 1, -1) if n > 1 or values.len > 1 else grad
        grad_w = grad_v = None
        if ctx.needs_input_grad[0]:
            if n == 1:  # a softmax over one layer has a zero Jacobian: this gradient never reaches the logits
                grad_w = torch.zeros_like(weights)
            else:
                grad_w = torch.bmm(g, _per_head(values.buf, n, b * heads).transpose(1, 2)).view(b, heads, n).to(weights.dtype)
        if n == 1 and values.len == 1:  # the stage's only value: no later block contributed
            grad_v = grad if ctx.needs_input_grad[1] else None
        elif ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            task = torch._C._current_graph_task_id()
            if values.grad is None or values.grad_task != task:  # the first retrieval of this backward pass
                values.grad = g.new_empty((n, b * heads, g.shape[-1]))
                values.grad_len, values.grad_task = 0, task
            # slot s gets alpha_s * g: one broadcast multiply(-add) over all the slots read here
            w = weights.reshape(b * heads, n).t().contiguous().unsqueeze(-1).to(g.dtype)  # [n, B*heads, 1]
            g = g.view(1, b * heads, -1)
            k = min(values.grad_len, n)  # slots [0, k) hold the partial sums of later blocks
            if k:
                values.grad[:k].addcmul_(w[:k], g)
            if n > k:
                torch.mul(w[k:], g, out=values.grad[k:n])
            # slot n-1 now has every contribution: later blocks ran first (see ``link``)
            grad_v = values.grad[n - 1].view(grad.shape) if ctx.needs_input_grad[1] else None
            values.grad_len = n - 1
            if n == 1:
                values.grad = None
        return grad_w, grad_v, None, None


def aggregate(weights: Tensor, values: list[Tensor]) -> Tensor:
    """Attention-weighted sum of a list of values, per head (paper eq. 5).

    Models use :meth:`LayerMemory.retrieve`, which keeps a stage's values in one buffer; this
    function is the same sum for values held anywhere, in plain differentiable ops (a reference).

    Args:
        weights: attention distribution ``[B, heads, n]`` over the ``n`` layers in ``values``.
        values: ``n`` tensors ``[B, C, H, W]``; channels split contiguously into ``heads`` groups.

    Returns:
        ``[B, C, H, W]``: for head h, ``sum_s weights[:, h, s] * values[s][:, h-th channel group]``.
    """
    if weights.shape[-1] != len(values):
        raise ValueError(f"got {weights.shape[-1]} attention weights for {len(values)} values")
    b, heads, n = weights.shape
    stacked = _per_head(torch.stack([v.reshape(b, -1) for v in values]), n, b * heads)  # [B*heads, n, d*H*W]
    out = torch.bmm(weights.reshape(b * heads, 1, n).to(stacked.dtype), stacked)
    return out.view(values[-1].shape)
