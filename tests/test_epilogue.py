"""The fused attention-branch epilogue (BN + act + DropPath + add in native kernels) against float64 references."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import elanet
import elanet.kernels as kernels
from elanet.attention import DropPath
from elanet.attention.aggregate import LayerMemory, aggregate
from elanet.attention.epilogue import branch_add, fused_epilogue_ok, gated_branch_add

from conftest import CAN_BUILD


@pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")
def test_kernels_build_where_a_compiler_exists(use_kernels):
    use_kernels(True)  # CI has gcc: the fused path is what its training runs take
    assert kernels.build_error() is None


@pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_epilogue_matches_float64(use_kernels, relu, momentum):
    """Output, every gradient and the running statistics agree with float64 BN/ReLU/DropPath, at least as
    closely as PyTorch's own float32 operators do."""
    torch.manual_seed(0)
    b, c, h, w = 6, 16, 5, 3
    a64, x64, up64 = (torch.randn(b, c, h, w, dtype=torch.float64) * s + o for s, o in ((1.5, 0.2), (1, 0), (1, 0)))
    bn = nn.BatchNorm2d(c, momentum=momentum)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_(0, 0.2)
    bn.running_mean.normal_()
    drop = DropPath(0.4).train()

    def run(dtype, fused):
        use_kernels(fused)
        norm = copy.deepcopy(bn).to(dtype)
        norm.num_batches_tracked.fill_(3)
        a = a64.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        x = x64.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        assert fused_epilogue_ok(x, norm) == fused
        torch.manual_seed(5)  # the same DropPath draw in every run
        out = branch_add(x, a, norm, drop, relu=relu)
        assert out.is_contiguous(memory_format=torch.channels_last)
        out.backward(up64.to(dtype).contiguous(memory_format=torch.channels_last))
        grad_a = a.grad
        assert norm.num_batches_tracked.item() == 4
        return [t.double() for t in (out, grad_a, x.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var)]

    want = run(torch.float64, False)
    fused, eager32 = run(torch.float32, True), run(torch.float32, False)
    for name, f, e, r in zip(("out", "grad a", "grad x", "grad gamma", "grad beta", "running mean", "running var"), fused, eager32, want):
        err_f, err_e = ((f - r).abs().max() / r.abs().max()).item(), ((e - r).abs().max() / r.abs().max()).item()
        assert err_f <= max(2 * err_e, 1e-6), (name, err_f, err_e)


@pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")
def test_gated_epilogue_matches_float64(use_kernels):
    """MRLA-L's gate * v + lambda * identity, BN, DropPath and add (eq. 7) fused, against float64 PyTorch ops."""
    torch.manual_seed(0)
    b, c, h, w = 5, 12, 4, 3
    v64, id64, x64, up64 = (torch.randn(b, c, h, w, dtype=torch.float64) for _ in range(4))
    gate64, lam64 = torch.rand(b, c, 1, 1, dtype=torch.float64), torch.randn(1, c, 1, 1, dtype=torch.float64)
    bn = nn.BatchNorm2d(c)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_(0, 0.2)
    drop = DropPath(0.4).train()

    def run(dtype, fused):
        use_kernels(fused)
        norm = copy.deepcopy(bn).to(dtype)
        cl = lambda t: t.detach().to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()  # noqa: E731
        v, identity, x = cl(v64), cl(id64), cl(x64)
        gate, lam = (t.detach().clone().to(dtype).requires_grad_() for t in (gate64, lam64))
        torch.manual_seed(5)
        if fused:
            assert fused_epilogue_ok(x, norm, v, identity)
            out = gated_branch_add(x, v, gate, identity, lam, norm, drop)
        else:
            out = branch_add(x, gate * v + lam * identity, norm, drop, relu=False)
        out.backward(up64.to(dtype).contiguous(memory_format=torch.channels_last))
        return [t.double() for t in (out, v.grad, identity.grad, x.grad, gate.grad, lam.grad, norm.weight.grad, norm.bias.grad,
                                     norm.running_mean, norm.running_var)]

    want = run(torch.float64, False)
    fused, eager32 = run(torch.float32, True), run(torch.float32, False)
    for i, (f, e, r) in enumerate(zip(fused, eager32, want)):
        err_f, err_e = ((f - r).abs().max() / r.abs().max()).item(), ((e - r).abs().max() / r.abs().max()).item()
        assert err_f <= max(2 * err_e, 1e-6), (i, err_f, err_e)


@pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")
def test_fused_epilogue_is_deterministic(use_kernels):
    """The same inputs give bitwise the same outputs and gradients: what exact resume relies on."""
    use_kernels(True)
    torch.manual_seed(0)
    model = elanet.create_model("resnet20_ela", drop_path=0.1).to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        torch.manual_seed(1)
        m(x).square().mean().backward()
        runs.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert all(torch.equal(g1, g2) for g1, g2 in zip(*runs))


@pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")
@pytest.mark.parametrize("name", ["resnet20_ela", "resnet20_mrla_b", "resnet20_mrla_l"])
def test_model_step_fused_equals_pytorch_ops(use_kernels, name):
    """A channels-last training step with the kernels gives the PyTorch path's loss, gradients and BN statistics."""
    torch.manual_seed(0)
    model = elanet.create_model(name, drop_path=0.1).double().to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    # reference in float64 (PyTorch ops), then both float32 paths; the fused one must be as close as eager float32
    results = {}
    for key, dtype, fused in (("ref", torch.float64, False), ("eager", torch.float32, False), ("fused", torch.float32, True)):
        use_kernels(fused)
        m = copy.deepcopy(model).to(dtype)
        torch.manual_seed(1)
        loss = m(x.to(dtype)).square().mean()
        loss.backward()
        results[key] = (loss.double(), [p.grad.double() for p in m.parameters()], [b.double() for b in m.buffers()])
    ref, eager, fused = results["ref"], results["eager"], results["fused"]
    assert abs(fused[0] - ref[0]) <= max(4 * abs(eager[0] - ref[0]), 1e-6 * abs(ref[0]))
    grad_err = lambda r: max(((g - w).norm() / (w.norm() + 1e-30)).item() for g, w in zip(r[1], ref[1]))  # noqa: E731
    assert grad_err(fused) <= max(4 * grad_err(eager), 1e-5)
    buf_err = lambda r: max((b - w).abs().max().item() for b, w in zip(r[2], ref[2]))  # noqa: E731
    assert buf_err(fused) <= max(4 * buf_err(eager), 1e-5)


def test_kernels_off_and_unbuildable_fall_back_to_pytorch_ops(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("ELANET_KERNELS", "0")
    assert kernels.epilogue_lib() is None and "ELANET_KERNELS=0" in kernels.build_error()
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.delenv("ELANET_KERNELS")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ELANET_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="no C compiler .* PyTorch operators"):
        assert kernels.epilogue_lib() is None
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(8).train()
    assert not fused_epilogue_ok(x, bn)
    out = branch_add(x, torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last), bn, DropPath(0.0), relu=True)
    assert out.shape == x.shape


@pytest.mark.parametrize("case", ["eval", "nchw", "float64"])
def test_fused_path_only_where_it_applies(case):
    x = torch.randn(2, 8, 3, 3)
    bn = nn.BatchNorm2d(8).train()
    if case == "eval":
        bn.eval()
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "float64":
        x, bn = x.double().contiguous(memory_format=torch.channels_last), bn.double()
    assert not fused_epilogue_ok(x, bn)


@pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")
@pytest.mark.parametrize("capacity", [4, 6, None])
@pytest.mark.parametrize("used", [[0, 2, 3], [0, 1], [3]])
def test_native_retrieval_matches_float64_aggregate(use_kernels, capacity, used):
    """Channels-last float32 retrievals (values kept in place, one-pass backward) against the float64 reference
    ``aggregate``: every block's output, every value's and every attention weight's gradient, when only some
    blocks' outputs reach the loss (an earlier, the later or only the last ones) and with a retained graph run
    backward twice. Capacities 4 and 6 (room for more values than the four stored) take the native path,
    None the stage buffer."""
    use_kernels(True)
    torch.manual_seed(0)
    b, c, h, w, heads, n = 3, 8, 4, 5, 2, 4
    v64 = [torch.randn(b, c, h, w, dtype=torch.float64) for _ in range(n)]
    logits64 = [torch.randn(b, heads, t + 1, dtype=torch.float64) for t in range(n)]
    up64 = [torch.randn(b, c, h, w, dtype=torch.float64) for _ in range(n)]

    def run(dtype, native):
        leaves = [t.detach().to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_() for t in v64]
        logits = [t.detach().to(dtype).requires_grad_() for t in logits64]
        mem = LayerMemory(capacity=capacity)
        outs = []
        for t in range(n):
            weights = logits[t].softmax(-1)
            outs.append(mem.retrieve(weights, leaves[t] * 1.0) if native else aggregate(weights, leaves[: t + 1]))
            if native and t:
                assert type(outs[-1].grad_fn).__name__ == ("_RetrieveNativeBackward" if capacity else "_RetrieveBackward")
        loss = sum((outs[t] * up64[t].to(dtype)).sum() for t in used)
        inputs = leaves + logits
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        again = torch.autograd.grad(loss, inputs, allow_unused=True) if native else grads
        dense = lambda gs: [torch.zeros_like(x, dtype=torch.float64) if g is None else g.double() for g, x in zip(gs, inputs)]  # noqa: E731
        return [o.double() for o in outs], dense(grads), dense(again)

    outs, grads, again = run(torch.float32, True)
    ref_outs, ref_grads, _ = run(torch.float64, False)
    for o, r in zip(outs, ref_outs):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    for g, g2, r in zip(grads, again, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        assert torch.equal(g, g2)


@pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")
def test_native_retrieval_keeps_no_graph_alive(use_kernels):
    """The values the native path keeps hold no autograd history: once a step's outputs are gone, its
    values, graph and buffers are freed (a reference cycle through the graph leaked ~0.7 GB per
    ResNet-110 step)."""
    import gc
    import weakref

    use_kernels(True)
    model = elanet.create_model("resnet20_mrla_b").to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    seen = []
    hook = model.layer1[1].attn.conv_v.register_forward_hook(lambda mod, inp, out: seen.append(weakref.ref(out)))
    model(x).square().mean().backward()
    hook.remove()
    gc.collect()
    assert seen and seen[0]() is None


@pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")
@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_retrieve_add_fused_matches_float64(use_kernels, drop):
    """``LayerMemory.retrieve_add`` (retrieval + BN + ReLU + DropPath + add in one native function, o's gradient
    formed inside the retrieval's backward) against float64 ``aggregate`` + ``nn.BatchNorm2d``: outputs, the
    gradients of values, weights, block outputs and BN's affine parameters, and BN's running statistics."""
    use_kernels(True)
    b, c, h, w, heads, n = 3, 16, 4, 5, 2, 3
    v64 = [torch.randn(b, c, h, w, dtype=torch.float64) for _ in range(n)]
    x64 = [torch.randn(b, c, h, w, dtype=torch.float64) for _ in range(n)]
    logits64 = [torch.randn(b, heads, t + 1, dtype=torch.float64) for t in range(n)]
    up64 = [torch.randn(b, c, h, w, dtype=torch.float64) for _ in range(n)]
    bns64 = [nn.BatchNorm2d(c).double().train() for _ in range(n)]
    for bn in bns64:
        nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)

    def run(dtype, fused):
        leaves = [t.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_() for t in v64 + x64]
        logits = [t.to(dtype).requires_grad_() for t in logits64]
        bns = [copy.deepcopy(bn).to(dtype) for bn in bns64]
        mem, outs = LayerMemory(capacity=n), []
        torch.manual_seed(3)
        for t in range(n):
            weights, v, x = logits[t].softmax(-1), leaves[t] * 1.0, leaves[n + t] * 1.0
            if fused:
                outs.append(mem.retrieve_add(weights, v, x, bns[t], DropPath(drop).train()))
                assert type(outs[-1].grad_fn).__name__ == "_RetrieveNativeBackward"
            else:
                keep = DropPath(drop).train().sample_scale(x)
                y = torch.relu(bns[t](aggregate(weights, [lv * 1.0 for lv in leaves[: t + 1]])))
                outs.append(x + (y if keep is None else y * keep))
        loss = sum((o * u.to(dtype)).sum() for o, u in zip(outs, up64))
        params = [p for bn in bns for p in bn.parameters()]
        grads = torch.autograd.grad(loss, leaves + logits + params)
        return [o.double() for o in outs], [g.double() for g in grads], [s.double() for bn in bns for s in (bn.running_mean, bn.running_var)]

    outs, grads, stats = run(torch.float32, True)
    ref_outs, ref_grads, ref_stats = run(torch.float64, False)
    for got, want in zip(outs + grads + stats, ref_outs + ref_grads + ref_stats):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
