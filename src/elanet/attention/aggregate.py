"""Retrieval over the layers of a stage: the per-forward key/value memory and its aggregation.

The aggregation o_t = sum_s alpha_{t,s} v_s (paper eq. 5) is one batched matrix product per block.
A stage keeps the values of its active blocks in one buffer ``[layers, B*heads, d*H*W]``, each
head's channels contiguous; block t reads its t values through a strided view, so it copies nothing
and its cost grows with the number of active layers it reads.

Both memory layouts run natively. For NCHW values a head's slot is ``[d, H, W]``, which is the value
itself; for channels-last values it is ``[H, W, d]``, so storing a value is one copy either way and
the product is the same ``bmm``. The channels-last output is written straight into a channels-last
tensor, and the gradient reaches the value in its own layout.

Backward mirrors the forward: every block adds its share of the earlier values' gradients into
partial sums with one broadcast multiply-add. The partial sums travel backwards through autograd
itself, as the gradient of a zero-stride "link" output that each retrieval hands to the next one:
a value receives its complete gradient when the backward pass reaches its own block, and nothing
outside the graph keeps gradient state, so partial, repeated and retained backward passes need no
bookkeeping.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..kernels import epilogue_lib
from .epilogue import _backward_sums, _bn_backward_coefficients, _normalise_add, _stats, branch_add, fused_epilogue_ok

__all__ = ["LayerMemory", "aggregate"]


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` [B, C, H, W] is laid out channels-last (and not also plainly contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _heads(x: Tensor, heads: int, channels_last: bool) -> Tensor:
    """``[B, C, H, W]`` as the 5-D view a buffer slot holds: ``[B, heads, d, H, W]`` or, channels-last,
    ``[B, heads, H, W, d]`` (a view for any strides)."""
    x = x.unflatten(1, (heads, -1))
    return x.permute(0, 1, 3, 4, 2) if channels_last else x


class _Values:
    """A stage's values in one buffer, slot s holding the s-th value per head.

    Shared by the memory and the backward of every retrieval; it holds no autograd outputs, so
    no reference cycle runs through the graph.
    """

    __slots__ = ("capacity", "buf", "shape", "len", "channels_last", "tensors", "weights")

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.buf: Tensor | None = None  # [capacity, B*heads, d*H*W]
        self.shape: torch.Size | None = None
        self.len = 0
        self.channels_last = False
        self.tensors: list[Tensor] | None = None  # the native path keeps the values themselves, uncopied
        self.weights: list[Tensor] = []  # and each block's attention weights per channel, [B, n, C]

    def keep(self, value: Tensor, weights: Tensor) -> None:
        """Keep ``value`` itself as the next layer (the native kernels read channels-last values in place),
        with its block's weights over the layers per channel ``[B, n, C]`` (read by the earlier blocks' backward)."""
        if self.capacity is not None and self.len >= self.capacity:
            raise ValueError(f"the memory holds at most {self.capacity} values (its capacity); pass capacity=None to let it grow")
        if self.tensors is None:
            self.tensors, self.shape, self.channels_last = [], value.shape, True
        self.tensors.append(value.detach())  # the same memory without its graph: no reference cycle through autograd
        self.weights.append(weights)
        self.len += 1

    def slot(self, s: int, heads: int) -> Tensor:
        """Slot s as the 5-D per-head view of :func:`_heads`."""
        b, c, h, w = self.shape
        d = c // heads
        dims = (b, heads, h, w, d) if self.channels_last else (b, heads, d, h, w)
        return self.buf[s].view(dims)

    def store(self, value: Tensor, heads: int) -> None:
        if self.capacity == 1 and self.len == 0:  # the stage's only value: no later block reads it, keep nothing
            self.shape, self.len, self.channels_last = value.shape, 1, _channels_last(value)
            return
        if self.capacity is not None and self.len >= self.capacity:
            raise ValueError(f"the memory holds at most {self.capacity} values (its capacity); pass capacity=None to let it grow")
        if self.buf is None:
            self.shape, self.channels_last = value.shape, _channels_last(value)
            self.buf = value.new_empty((max(self.capacity or 1, 1), value.shape[0] * heads, value[0].numel() // heads))
        elif self.len == self.buf.shape[0]:  # over capacity: double, copying the earlier slots
            grown = self.buf.new_empty((2 * self.len, *self.buf.shape[1:]))
            grown[: self.len].copy_(self.buf)
            self.buf = grown
        self.slot(self.len, heads).copy_(_heads(value, heads, self.channels_last))
        self.len += 1


def _per_head(buf: Tensor, n: int) -> Tensor:
    """Slots ``[0, n)`` of a ``[slots, B*heads, X]`` buffer as ``[B*heads, n, X]`` (a view, no copy)."""
    return buf[:n].transpose(0, 1)


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
        self._link: Tensor | None = None  # carries the earlier values' gradient partial sums backwards
        self._traced: list[Tensor] = []  # values stored under torch.compile (see retrieve)

    def __len__(self) -> int:
        return self._values.len + len(self._traced)

    @property
    def values(self) -> list[Tensor]:
        """The stored values ``[B, C, H, W]`` in their layout, oldest first (copies of the buffer's slots).

        Empty for a memory of capacity 1: the only value of a stage is read once and not kept.
        """
        v = self._values
        if v.tensors is not None:
            return [t.clone() for t in v.tensors]
        if v.buf is None:
            return []
        heads = v.buf.shape[1] // v.shape[0]
        fmt = torch.channels_last if v.channels_last else torch.contiguous_format
        outs = []
        for s in range(v.len):
            out = torch.empty(v.shape, dtype=v.buf.dtype, device=v.buf.device, memory_format=fmt)
            _heads(out, heads, v.channels_last).copy_(v.slot(s, heads))
            outs.append(out)
        return outs

    def retrieve(self, weights: Tensor, value: Tensor) -> Tensor:
        """Store ``value`` as the newest layer, then aggregate all stored values (paper eq. 5).

        Three paths compute the same sum. Under ``torch.compile`` and ``torch.export``: plain
        differentiable ops on a list of the values (:func:`aggregate`), which the compiler traces
        without a graph break and which export to ONNX without in-place stores (onnxruntime runs
        those as scatters over the whole buffer, 4x slower end to end). Eagerly with gradients: the
        custom autograd below. Eagerly without gradients (inference): plain ops on the stage's buffer.

        Args:
            weights: attention ``[B, heads, n]`` over the ``n = len(self) + 1`` layers, newest last: a
                softmax over the layers. With one layer it is constantly 1, so no gradient reaches it.
            value: ``[B, C, H, W]`` value of the current layer, NCHW or channels-last; channels split
                contiguously into heads.

        Returns:
            ``[B, C, H, W]`` in the layout of the stored values: for head h,
            ``sum_s weights[:, h, s] * v_s[:, h-th channel group]``.
        """
        self._check(weights, value)
        if torch.compiler.is_compiling():  # torch.compile / torch.export: no in-place stores (ONNX makes them scatters)
            self._traced.append(value)
            if len(self._traced) == 1 and not torch.is_grad_enabled():  # a softmax over one layer is exactly 1
                return value
            return aggregate(weights, self._traced)
        if not torch.is_grad_enabled():
            return self._retrieve_inference(weights, value)
        if self._native(weights, value):
            return self._retrieve_native(weights, value)
        return self._retrieve_autograd(weights, value)

    def retrieve_add(self, weights: Tensor, value: Tensor, x: Tensor, bn: nn.BatchNorm2d, drop_path: nn.Module) -> Tensor:
        """The MRLA-B / ELA block's output ``x + DropPath(ReLU(BN(o)))`` with ``o`` from :meth:`retrieve`
        (paper eq. 5).

        Where the native kernels apply to both (float32 channels-last CPU training), the retrieval
        and the epilogue are one autograd function: the retrieval's pass also gives BatchNorm its
        statistics, and its backward forms the epilogue's gradient from the block's output gradient
        instead of reading it back from memory. Elsewhere it is ``branch_add(x, retrieve(...))``.
        """
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and fused_epilogue_ok(x, bn, value) \
                and self._native(weights, value):
            self._check(weights, value)
            return self._retrieve_add_native(weights, value, x, bn, drop_path)
        return branch_add(x, self.retrieve(weights, value), bn, drop_path, relu=True)

    def _check(self, weights: Tensor, value: Tensor) -> None:
        if weights.shape[-1] != len(self) + 1:
            raise ValueError(f"got {weights.shape[-1]} attention weights for {len(self) + 1} values (stored + new)")
        if value.ndim != 4 or weights.shape[0] != value.shape[0] or value.shape[1] % weights.shape[1]:
            raise ValueError(f"weights {tuple(weights.shape)} do not fit a value of shape {tuple(value.shape)}")
        if self._values.shape is not None and value.shape != self._values.shape:
            raise ValueError(f"value shape {tuple(value.shape)} differs from the stage's {tuple(self._values.shape)}")

    def _native(self, weights: Tensor, value: Tensor) -> bool:
        """Whether this retrieval takes the native kernels: a stage of known capacity above one, values kept in place."""
        return self._values.buf is None and self._values.capacity not in (None, 1) and _native_ok(weights, value)

    @torch.compiler.disable
    def _retrieve_add_native(self, weights: Tensor, value: Tensor, x: Tensor, bn: nn.BatchNorm2d, drop_path: nn.Module) -> Tensor:
        keep = drop_path.sample_scale(x)
        out, self._link = _RetrieveNative.apply(weights, value, self._link, self._values, x, bn.weight, bn.bias, bn,
                                                None if keep is None else keep.view(-1))
        return out

    @torch.compiler.disable
    def _retrieve_native(self, weights: Tensor, value: Tensor) -> Tensor:
        out, self._link = _RetrieveNative.apply(weights, value, self._link, self._values)
        return out

    @torch.compiler.disable
    def _retrieve_autograd(self, weights: Tensor, value: Tensor) -> Tensor:
        out, self._link = _Retrieve.apply(weights, value, self._link, self._values)
        return out

    # --- inference path: no autograd, plain tensor ops, so torch.export / ONNX can trace it -------------
    def _retrieve_inference(self, weights: Tensor, value: Tensor) -> Tensor:
        """The forward of :class:`_Retrieve` without the custom autograd (used when grad is disabled)."""
        b, heads, n = weights.shape
        v = self._values
        v.store(value, heads)
        if n == 1:  # a softmax over one layer is exactly 1: o_1 = v_1
            return value
        stacked = _per_head(v.buf, n)  # [B*heads, n, X], a view of the stage's buffer
        o = torch.bmm(weights.reshape(b * heads, 1, n).to(stacked.dtype), stacked)
        if not v.channels_last:
            return o.view(value.shape)
        out = torch.empty_like(value, memory_format=torch.channels_last)
        _heads(out, heads, True).copy_(o.view(v.slot(0, heads).shape))
        return out


class _Retrieve(torch.autograd.Function):
    """Store the newest value in the stage's buffer and aggregate the first n slots.

    Autograd sees (weights, newest value, link). ``link`` is the previous retrieval's second
    output, an ``[n-1, B*heads, X]`` zero-stride tensor standing for the earlier slots; its
    gradient is the partial sums of those slots' gradients. Backward adds this block's share to
    the partial sums it receives, returns the complete gradient of its own value, and passes the
    rest on as the gradient of ``link``. Consuming ``link`` also orders the backward of
    consecutive retrievals: later blocks run first.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, value: Tensor, link: Tensor | None, values: _Values):  # type: ignore[override]
        b, heads, n = weights.shape
        values.store(value, heads)
        ctx.set_materialize_grads(False)
        ctx.values, ctx.n, ctx.heads = values, n, heads
        ctx.save_for_backward(weights)
        if values.buf is None:  # the stage's only value: a softmax over one layer is exactly 1
            out = value.view_as(value)
        else:
            stacked = _per_head(values.buf, n)  # [B*heads, n, X]
            o = torch.bmm(weights.reshape(b * heads, 1, n).to(stacked.dtype), stacked)  # [B*heads, 1, X]
            if values.channels_last:  # written once, into the value's layout
                out = torch.empty_like(value, memory_format=torch.channels_last)
                _heads(out, heads, True).copy_(o.view(values.slot(0, heads).shape))
            else:
                out = o.view(value.shape)
        link_out = value.new_zeros(()).expand(n, b * heads, value[0].numel() // heads)
        return out, link_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor | None, partial: Tensor | None):  # type: ignore[override]
        values, n, heads = ctx.values, ctx.n, ctx.heads
        (weights,) = ctx.saved_tensors
        b = weights.shape[0]
        grad_w = grad_v = grad_link = None
        if values.buf is None:  # the lone value: out = value, and the weight is constantly 1
            if ctx.needs_input_grad[0]:
                grad_w = torch.zeros_like(weights)
            return grad_w, grad, None, None
        if grad is None and partial is None:
            return None, None, None, None
        cl = values.channels_last
        shape5 = values.slot(0, heads).shape  # a slot as [B, heads, ...]
        g = None if grad is None else _heads(grad, heads, cl).contiguous().view(b * heads, 1, -1)  # buffer order
        if ctx.needs_input_grad[0]:
            if n == 1 or g is None:  # a softmax over one layer has a zero Jacobian: no product needed
                grad_w = torch.zeros_like(weights)
            else:
                grad_w = torch.bmm(g, _per_head(values.buf, n).transpose(1, 2)).view(b, heads, n).to(weights.dtype)
        w = weights.reshape(b * heads, n).t().contiguous().unsqueeze(-1)  # [n, B*heads, 1]
        last = n if not cl else n - 1  # channels-last: the newest slot is written straight into the value's layout
        if g is not None:  # slot s gets alpha_s * g: one broadcast multiply(-add) over the slots
            w, g = w.to(g.dtype), g.view(1, b * heads, -1)
            if partial is None:  # the first retrieval of this backward pass to receive a gradient
                partial = torch.mul(w[:last], g, out=g.new_empty((last, *g.shape[1:]))) if last else None
            else:
                partial[:last].addcmul_(w[:last], g)
        # slot n-1 now has every contribution: later blocks ran first (they consumed ``link``)
        if ctx.needs_input_grad[1]:
            if not cl:
                grad_v = partial[n - 1].view(grad.shape if grad is not None else values.shape)
            else:
                grad_v = torch.empty(values.shape, dtype=(g if g is not None else partial).dtype, device=weights.device,
                                     memory_format=torch.channels_last)
                dst = _heads(grad_v, heads, True)
                if g is None:
                    dst.copy_(partial[n - 1].view(shape5))
                elif partial is None or n > partial.shape[0]:
                    torch.mul(g.view(shape5), w[n - 1].view(b, heads, 1, 1, 1), out=dst)
                else:
                    torch.addcmul(partial[n - 1].view(shape5), g.view(shape5), w[n - 1].view(b, heads, 1, 1, 1), out=dst)
        if n > 1 and ctx.needs_input_grad[2] and partial is not None:
            grad_link = partial[: n - 1]
        return grad_w, grad_v, grad_link, None


def _native_ok(weights: Tensor, value: Tensor) -> bool:
    """Whether the native retrieval kernels apply: eager float32 channels-last CPU values with a multiple
    of 8 channels (the kernels' vector width), kernels built."""
    return (value.device.type == "cpu" and value.dtype == torch.float32 and weights.dtype == torch.float32
            and value.ndim == 4 and value.shape[1] % 8 == 0 and value.is_contiguous(memory_format=torch.channels_last)
            and epilogue_lib() is not None)


def _ptrs(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class _EpilogueArgs(ctypes.Structure):
    """``ret_epilogue`` of ``kernels/epilogue.c``: what the retrieval's backward needs to form the epilogue's gradient."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("grad", "o", "scale", "shift", "mean", "keep", "c1", "c2", "c3")]


class _RetrieveNative(torch.autograd.Function):
    """:class:`_Retrieve` for channels-last float32 CPU values, in the native kernels of ``kernels/epilogue.c``.

    The values stay where the value convolution wrote them (no copy into a per-head buffer), and the
    sum is written channels-last in one pass. Backward "pulls": a value's gradient is
    ``sum_{t >= s} alpha_{t,s} g_t`` over the blocks that read it, so each block keeps its output's
    gradient ``g_t`` in a stage buffer ``[N, B, H*W*C]`` (N = the memory's capacity) and forms its own
    value's gradient from the later blocks' kept gradients, in the same pass as the products that
    give its attention weights' gradient. That reads each later gradient once, where adding every
    block's share into partial sums of all earlier values read and wrote each of them. The buffer
    travels backwards through autograd as the gradient of the zero-stride ``link`` output, so nothing
    outside the graph keeps gradient state.

    With ``x`` given it also applies the block's epilogue ``x + keep * ReLU(BN_train(o))`` (see
    ``attention/epilogue.py``) and returns the block's output: BN's statistics come from the
    retrieval's own pass, and backward forms ``o``'s gradient on the fly from the output's.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, value: Tensor, link: Tensor | None, values: _Values, x: Tensor | None = None,  # type: ignore[override]
                bn_weight: Tensor | None = None, bn_bias: Tensor | None = None, bn: nn.BatchNorm2d | None = None,
                keep: Tensor | None = None):
        b, heads, n = weights.shape
        _, c, h, w = value.shape
        amap = weights.detach().repeat_interleave(c // heads, dim=1).transpose(1, 2).contiguous()  # [B, n, C]
        values.keep(value, amap)
        ctx.set_materialize_grads(False)
        ctx.values, ctx.n, ctx.heads = values, n, heads
        ctx.save_for_backward(weights)
        if n == 1:  # a softmax over one layer is exactly 1: o_1 = v_1
            o = value.view_as(value) if x is None else values.tensors[0]
            sums = None if x is None else _stats(o)
        else:
            o = torch.empty_like(value, memory_format=torch.channels_last)
            sums = None if x is None else torch.empty(2, c, dtype=torch.float64)
            if epilogue_lib().elanet_ret_forward(_ptrs(values.tensors[:n]), n, b, h * w, c, amap.data_ptr(), o.data_ptr(),
                                                 None if sums is None else sums.data_ptr()):
                raise MemoryError("the native retrieval could not allocate its per-thread sums")
        ctx.epilogue = None
        out = o
        if x is not None:
            out, stats = _normalise_add(o, x, sums, bn_weight, bn_bias, bn, keep, relu=True)
            ctx.epilogue = (o, keep, stats)
        link_out = value.new_zeros(()).expand(values.capacity, b, value[0].numel())
        return out, link_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor | None, kept: Tensor | None):  # type: ignore[override]
        values, n, heads = ctx.values, ctx.n, ctx.heads
        (weights,) = ctx.saved_tensors
        if grad is None and kept is None:
            return (None,) * 9
        lib = epilogue_lib()
        b, c, h, w = values.shape
        total = values.capacity
        g = None if grad is None else grad.contiguous(memory_format=torch.channels_last)
        ep, grad_x, grad_bn = None, None, (None, None)
        if ctx.epilogue is not None and g is not None:  # BN's backward coefficients; o's gradient is formed in the kernel
            o, keep, stats = ctx.epilogue
            scale, shift, mean, invstd, bn_weight = stats
            sums = _backward_sums(o, g, stats, keep, relu=True)
            c1, c2, c3 = _bn_backward_coefficients(sums, b * h * w, bn_weight, invstd)
            ep = _EpilogueArgs(*[None if t is None else t.data_ptr() for t in (g, o, scale, shift, mean, keep, c1, c2, c3)])
            grad_x = g if ctx.needs_input_grad[4] else None
            grad_bn = ((sums[1] * invstd).float() if ctx.needs_input_grad[5] else None,
                       sums[0].float() if ctx.needs_input_grad[6] else None)
        stored = values.len  # the blocks that ran forward (the capacity may hold more)
        if kept is None:  # no later block passed gradients back: this is the first backward of the stage
            kept = g.new_empty((total, b, h * w * c))
            kept[n:stored].zero_()  # slots of later blocks that never ran backward (none when this is the last block)
        later = range(n, stored)  # slots of the later blocks n+1.., 0-indexed
        lw = values.weights
        later_ptrs = _ptrs([kept[t] for t in later])
        later_w = (ctypes.c_void_p * len(later))(*[lw[t].data_ptr() + (n - 1) * c * lw[t].element_size() for t in later])
        later_stride = (ctypes.c_int64 * len(later))(*[lw[t].shape[1] * c for t in later])
        grad_v = torch.empty(values.shape, dtype=torch.float32, memory_format=torch.channels_last)
        need_w = ctx.needs_input_grad[0] and n > 1 and g is not None
        ga = torch.empty((b, n, c), dtype=torch.float64) if need_w else None
        if lib.elanet_ret_backward(
                _ptrs(values.tensors[:n]), n, b, h * w, c, lw[n - 1].data_ptr(),
                None if g is None or ep is not None else g.data_ptr(), None if ep is None else ctypes.byref(ep),
                kept[n - 1].data_ptr() if n > 1 else None, later_ptrs, later_w, later_stride, len(later),
                grad_v.data_ptr(), None if ga is None else ga.data_ptr()):
            raise MemoryError("the native retrieval could not allocate its per-thread sums")
        grad_w = None
        if ctx.needs_input_grad[0]:
            if ga is None:  # one layer (a softmax over it has a zero Jacobian) or no gradient for the output
                grad_w = torch.zeros_like(weights)
            else:
                grad_w = ga.view(b, n, heads, c // heads).sum(-1).transpose(1, 2).to(weights.dtype)
        grad_link = kept if n > 1 and ctx.needs_input_grad[2] else None
        return grad_w, grad_v if ctx.needs_input_grad[1] else None, grad_link, None, grad_x, *grad_bn, None, None


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
    stacked = torch.stack([v.reshape(b * heads, -1) for v in values], dim=1)  # [B*heads, n, d*H*W]
    out = torch.bmm(weights.reshape(b * heads, 1, n).to(stacked.dtype), stacked)
    return out.view(values[-1].shape)
