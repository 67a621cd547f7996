"""The stage memory's buffered retrieval against the plain list aggregation (paper eq. 5)."""
from __future__ import annotations

import pytest
import torch

from elanet.attention import LayerMemory, aggregate

B, HEADS, C = 2, 2, 4


def chain(logits: list[torch.Tensor], values: list[torch.Tensor], *, buffered: bool, capacity: int | None = None) -> list[torch.Tensor]:
    """Block t attends over values 0..t with softmax(logits[t]), as the blocks of a stage do."""
    memory = LayerMemory(capacity=capacity)
    outs = []
    for t, (lg, v) in enumerate(zip(logits, values)):
        w = lg.softmax(-1)
        outs.append(memory.retrieve(w, v) if buffered else aggregate(w, values[: t + 1]))
    return outs


def inputs(n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    logits = [torch.randn(B, HEADS, t + 1, dtype=torch.float64, requires_grad=True) for t in range(n)]
    values = [torch.randn(B, C, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    return logits, values


@pytest.mark.parametrize("capacity", [None, 4])
def test_retrieve_matches_list_aggregation_values_and_gradients(capacity):
    logits, values = inputs(4)
    leaves = logits + values
    # weigh the outputs differently so every value's gradient mixes contributions of several blocks
    loss = lambda outs: sum((k + 1) * (o * o.detach().sin()).sum() for k, o in enumerate(outs))  # noqa: E731
    got, want = chain(logits, values, buffered=True, capacity=capacity), chain(logits, values, buffered=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    g_got = torch.autograd.grad(loss(got), leaves)
    g_want = torch.autograd.grad(loss(want), leaves)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_retrieve_gradcheck_and_repeated_backward():
    logits, values = inputs(3)
    assert torch.autograd.gradcheck(lambda *x: chain(list(x[:3]), list(x[3:]), buffered=True), (*logits, *values))
    outs = chain(logits, values, buffered=True)
    total = outs[0].sum() + 2 * outs[2].sum()  # block 1 unused: its share must still be right
    first = torch.autograd.grad(total, values, retain_graph=True)
    second = torch.autograd.grad(total, values)  # a second pass over the same graph starts afresh
    want = torch.autograd.grad(sum(k * o.sum() for k, o in zip((1, 0, 2), chain(logits, values, buffered=False))), values)
    for a, b, c in zip(first, second, want):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)
    only_first = torch.autograd.grad(chain(logits, values, buffered=True)[2].sum(), values[:1])[0]
    torch.testing.assert_close(only_first, torch.autograd.grad(chain(logits, values, buffered=False)[2].sum(), values[:1])[0])


def test_memory_length_capacity_and_lone_value():
    logits, values = inputs(3)
    memory = LayerMemory(capacity=2)
    for t in range(2):
        memory.retrieve(logits[t].softmax(-1), values[t])
        assert len(memory) == t + 1
    assert [torch.equal(a, b) for a, b in zip(memory.values, values)] == [True, True]
    with pytest.raises(ValueError, match="at most 2 values"):
        memory.retrieve(logits[2].softmax(-1), values[2])
    with pytest.raises(ValueError, match="2 attention weights for 1 values"):
        LayerMemory().retrieve(logits[1].softmax(-1), values[0])

    lone = LayerMemory(capacity=1)  # a stage with one active block: its value is read once, not kept
    out = lone.retrieve(logits[0].softmax(-1), values[0])
    torch.testing.assert_close(out, values[0], rtol=0, atol=0)  # a softmax over one layer is exactly 1
    assert len(lone) == 1 and lone.values == []
    (grad,) = torch.autograd.grad(out.sum(), logits[0], allow_unused=True)
    assert grad is not None and not grad.any()  # connected, and exactly zero

    grown = LayerMemory()  # no capacity: the buffer doubles and keeps the earlier values
    for t in range(3):
        grown.retrieve(logits[t].softmax(-1), values[t])
    assert all(torch.equal(a, b) for a, b in zip(grown.values, values))


def _model_chain(logits, values, fmt):
    """The buffered chain with every value in ``fmt``; outputs weighed so gradients mix blocks."""
    vs = [v.contiguous(memory_format=fmt) for v in values]
    outs = chain(logits, vs, buffered=True, capacity=len(vs))
    return outs, sum((k + 1) * (o * o.detach().cos()).sum() for k, o in enumerate(outs))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))])
def test_channels_last_matches_nchw_and_reference(device):
    """Both layouts give the reference aggregation's outputs and gradients; channels-last stays channels-last."""
    torch.manual_seed(0)
    n, heads, c = 4, 2, 8
    logits = [torch.randn(B, heads, t + 1, device=device, requires_grad=True) for t in range(n)]
    values = [torch.randn(B, c, 3, 5, device=device, requires_grad=True) for _ in range(n)]
    want_outs = [aggregate(lg.softmax(-1), values[: t + 1]) for t, lg in enumerate(logits)]
    want = torch.autograd.grad(sum((k + 1) * (o * o.detach().cos()).sum() for k, o in enumerate(want_outs)), logits + values)
    for fmt in (torch.contiguous_format, torch.channels_last):
        outs, loss = _model_chain(logits, values, fmt)
        assert all(o.is_contiguous(memory_format=fmt) for o in outs)
        for o, w in zip(outs, want_outs):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-6)
        got = torch.autograd.grad(loss, logits + values)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_channels_last_values_and_gradient_layout():
    """Stored values read back in their layout; the gradient reaches a channels-last value channels-last."""
    logits, values = inputs(3)
    cl = [v.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for v in values]
    memory = LayerMemory(capacity=3)
    outs = [memory.retrieve(lg.softmax(-1), v) for lg, v in zip(logits, cl)]
    assert all(torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last) for a, b in zip(memory.values, cl))
    grads = torch.autograd.grad(outs[0].sum() + 3 * outs[2].sum(), cl)
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads)
    want = torch.autograd.grad(sum(k * o.sum() for k, o in zip((1, 0, 3), chain(logits, values, buffered=False))), values)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_backward_state_lives_in_the_graph():
    """A backward pass that stops early leaves nothing behind for the next one (no global pass state)."""
    logits, values = inputs(3)
    outs = chain(logits, values, buffered=True)
    # only the newest block's own value: autograd never runs the earlier blocks' backward
    torch.autograd.grad(outs[2].sum(), values[2], retain_graph=True)
    got = torch.autograd.grad(outs[1].sum(), values[:2])
    want = torch.autograd.grad(chain(logits, values, buffered=False)[1].sum(), values[:2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_retrieval_under_torch_compile():
    """Compiled (aot_eager, so no C++ toolchain is needed), the retrieval breaks the graph cleanly
    and gives the reference gradients in both layouts."""
    torch._dynamo.reset()
    logits, values = inputs(3)
    want = torch.autograd.grad(sum((k + 1) * o.sum() for k, o in enumerate(chain(logits, values, buffered=False))), logits + values)

    def run(ls, vs):
        memory = LayerMemory(capacity=len(vs))
        return sum((k + 1) * memory.retrieve(lg.softmax(-1), v).sum() for k, (lg, v) in enumerate(zip(ls, vs)))

    compiled = torch.compile(run, backend="aot_eager")
    for fmt in (torch.contiguous_format, torch.channels_last):
        vs = [v.contiguous(memory_format=fmt) for v in values]
        got = torch.autograd.grad(compiled(logits, vs), logits + values)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
