"""Layer attention against hand-written float64 references (SPEC §2), the aggregation's gradients, recording."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import elanet
from elanet.attention import DropPath, MRLABase, MRLALight, aggregate, eca_kernel_size
from elanet.attention.layer import ela
from elanet.models import ResNet


# ---------------------------------------------------------------- float64 numpy references
def conv1d_same(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Cross-correlation of every row of y [B, C] with kernel w [k], zero padding k // 2."""
    k, c = len(w), y.shape[1]
    ypad = np.pad(y, ((0, 0), (k // 2, k // 2)))
    return sum(w[i] * ypad[:, i : i + c] for i in range(k))


def depthwise3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Depthwise 3x3 cross-correlation, x [B, C, H, W], w [C, 3, 3], zero padding 1."""
    h, wd = x.shape[2:]
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return sum(w[None, :, i, j, None, None] * xpad[:, :, i : i + h, j : j + wd] for i in range(3) for j in range(3))


def bn_eval(x: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    f = lambda t: t.detach().double().numpy()[None, :, None, None]  # noqa: E731
    return (x - f(bn.running_mean)) / np.sqrt(f(bn.running_var) + bn.eps) * f(bn.weight) + f(bn.bias)


def qkv(x: np.ndarray, attn: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = x.mean((2, 3))
    w = lambda conv: conv.weight.detach().double().numpy()  # noqa: E731
    return conv1d_same(y, w(attn.conv_q)[0, 0]), conv1d_same(y, w(attn.conv_k)[0, 0]), depthwise3x3(x, w(attn.conv_v)[:, 0])


def randomize_bn(bn: nn.BatchNorm2d) -> None:
    """Non-trivial eval statistics, so the reference checks the normalisation too."""
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1, 0.5)
        bn.bias.normal_(0, 0.5)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---------------------------------------------------------------- MRLA-B / ELA
def tiny_mrla_b() -> ResNet:
    """Two stages (3 and 2 blocks) of 32 / 64 channels, heads of 8 channels: 4 and 8 heads."""
    model = ResNet((3, 2), planes=(8, 16), strides=(1, 2), num_classes=4, attn=ela(head_dim=8))
    for m in model.modules():
        if isinstance(m, MRLABase):
            randomize_bn(m.bn)
    return model.double().eval()


@pytest.mark.parametrize("mask", [None, [True, False, True, True, False], [True, True, False, True, True]])
def test_mrla_b_matches_naive_reference(mask):
    model = tiny_mrla_b()
    if mask is not None:
        elanet.set_mask(model, mask)
    attns = [m for m in model.modules() if isinstance(m, MRLABase)]
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, a in enumerate(attns):
        a.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (as_np(args[0]), as_np(out))))
    with torch.no_grad(), elanet.record_attention(model) as rec:
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64))

    recorded = dict(zip(rec.blocks, rec.weights))
    for stage in range(2):
        keys, values = [], []
        for i, a in enumerate(attns):
            if a.stage_index != stage:
                continue
            x, out = seen[i]
            if not a.active:  # a pruned block returns its input untouched and joins no memory
                np.testing.assert_array_equal(out, x)
                assert i not in recorded
                continue
            q, k, v = qkv(x, a)
            keys.append(k)
            values.append(v)
            d = a.head_dim
            weights = np.zeros((x.shape[0], a.heads, len(keys)))
            o = np.zeros_like(x)
            for b in range(x.shape[0]):
                for h in range(a.heads):
                    ch = slice(h * d, (h + 1) * d)
                    logits = np.array([q[b, ch] @ key[b, ch] / math.sqrt(d) for key in keys])
                    e = np.exp(logits - logits.max())
                    weights[b, h] = e / e.sum()
                    for s, val in enumerate(values):
                        o[b, ch] += weights[b, h, s] * val[b, ch]
            expected = x + np.maximum(bn_eval(o, a.bn), 0.0)
            np.testing.assert_allclose(as_np(recorded[i]), weights, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("weights_grad", [True, False])
def test_aggregate_gradcheck(weights_grad):
    heads, n = 3, 4
    w = torch.rand(2, heads, n, dtype=torch.float64, requires_grad=weights_grad)
    vals = [torch.randn(2, heads * 2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    assert torch.autograd.gradcheck(lambda w, *v: aggregate(w, list(v)), (w, *vals))


def test_aggregate_matches_loop_and_checks_lengths():
    heads, d, n = 2, 3, 3
    w = torch.rand(2, heads, n, dtype=torch.float64)
    vals = [torch.randn(2, heads * d, 4, 4, dtype=torch.float64) for _ in range(n)]
    want = torch.zeros_like(vals[0])
    for h in range(heads):
        for s in range(n):
            want[:, h * d : (h + 1) * d] += w[:, h, s, None, None, None] * vals[s][:, h * d : (h + 1) * d]
    torch.testing.assert_close(aggregate(w, vals), want)
    with pytest.raises(ValueError, match="3 attention weights for 2 values"):
        aggregate(w, vals[:2])


# ---------------------------------------------------------------- MRLA-L
def test_mrla_l_matches_hand_reference():
    attn = MRLALight(16, head_dim=8).double().eval()
    randomize_bn(attn.bn)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    identity = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x, identity)

    xn, idn = as_np(x), as_np(identity)
    q, k, v = qkv(xn, attn)
    gate = np.zeros((2, 16, 1, 1))
    for b in range(2):
        for h in range(2):
            ch = slice(h * 8, (h + 1) * 8)
            gate[b, ch] = 1.0 / (1.0 + math.exp(-(q[b, ch] @ k[b, ch]) / math.sqrt(8)))
    a = gate * v + as_np(attn.lambda_t)[None, :, None, None] * idn
    np.testing.assert_allclose(as_np(out), xn + bn_eval(a, attn.bn), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_mrla_l_training_gradients_match_plain_ops(memory_format):
    """The training path's fused gate*v + lambda*identity gives the plain ops' output and gradients."""
    attn = MRLALight(16, head_dim=8).double().train()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    identity = torch.randn(2, 16, 3, 3, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    upstream = torch.randn(2, 16, 3, 3, dtype=torch.float64)

    def plain(x, identity):  # eq. 7 in plain differentiable ops
        q, k = attn.query_key(x.mean((2, 3)))
        gate = torch.sigmoid((q * k).sum(-1) * attn.scale).repeat_interleave(8, dim=1).view(2, 16, 1, 1)
        a = gate * attn.conv_v(x) + attn.lambda_t.view(1, 16, 1, 1) * identity
        return x + attn.bn(a)

    params = [x, identity, *attn.parameters()]
    out = attn(x, identity)
    assert out.is_contiguous(memory_format=memory_format)
    got = torch.autograd.grad(out, params, upstream)
    ref_out = plain(x, identity)
    want = torch.autograd.grad(ref_out, params, upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_mrla_l_receives_the_projected_identity():
    model = elanet.create_model("resnet20_mrla_l").eval()
    block = model.layer2[0]  # stride 2, 64 -> 128 channels: a projection shortcut
    got = {}
    block.register_forward_pre_hook(lambda mod, args: got.__setitem__("in", args[0]))
    block.attn.register_forward_hook(lambda mod, args, out: got.__setitem__("identity", args[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
        torch.testing.assert_close(got["identity"], block.downsample(got["in"]))


def test_mrla_l_parameters():
    attn = MRLALight(64)
    assert attn.lambda_t.shape == (64,)
    assert sum(p.numel() for p in attn.parameters()) == 12 * 64 + 2 * 3


# ---------------------------------------------------------------- pieces
def test_eca_kernel_size_by_hand():
    # t = int(|(log2 C + 1) / 2|), then made odd: 16 -> 2.5 -> 3; 64 -> 3.5 -> 3; 128 -> 4 -> 5; 2048 -> 6 -> 7.
    assert [eca_kernel_size(c) for c in (16, 64, 128, 256, 512, 1024, 2048)] == [3, 3, 5, 5, 5, 5, 7]


def test_drop_path():
    x = torch.ones(2000, 3, 2, 2)
    dp = DropPath(0.25)
    assert dp.eval()(x) is x
    y = dp.train()(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # whole samples dropped, rest rescaled
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.05
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop_path"):
            DropPath(bad)


def test_head_dim_must_divide_channels():
    with pytest.raises(ValueError, match="multiple of head_dim"):
        MRLABase(48, head_dim=32)


# ---------------------------------------------------------------- record_attention
def test_record_attention_every_block_in_forward_order():
    model = elanet.create_model("resnet56_mrla_b").eval()
    with torch.no_grad(), elanet.record_attention(model) as rec:
        model(torch.randn(3, 3, 16, 16))
    assert rec.blocks == list(range(18))
    assert rec.stages == [s for s in range(3) for _ in range(6)]
    heads = {0: 64 // 32, 1: 128 // 32, 2: 256 // 32}
    for i, (w, s) in enumerate(zip(rec.weights, rec.stages)):
        assert w.shape == (3, heads[s], i % 6 + 1)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, heads[s]))
        assert (w >= 0).all()


def test_record_attention_only_inside_the_context():
    model = elanet.create_model("resnet20_ela")  # training mode: weights must still come back detached
    x = torch.randn(2, 3, 16, 16)
    with elanet.record_attention(model) as rec:
        model(x).sum().backward()
    assert len(rec.weights) == 6 and not any(w.requires_grad for w in rec.weights)
    model(x)
    assert len(rec.weights) == 6  # a forward outside the context records nothing
    assert all(m.recorder is None for m in model.modules() if isinstance(m, MRLABase))


@pytest.mark.parametrize("name", ["resnet20", "resnet20_mrla_l"])
def test_record_attention_needs_mrla_b_blocks(name):
    with pytest.raises(ValueError, match="no MRLA-B / ELA blocks"):
        with elanet.record_attention(elanet.create_model(name)):
            pass


def test_stage_memory_restarts_every_forward():
    model = elanet.create_model("resnet20_ela").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first, second = model(x), model(x)
    torch.testing.assert_close(first, second)  # nothing from the first batch leaks into the second
