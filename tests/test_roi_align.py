"""RoIAlign's sparse-matrix CPU forward and backward against torchvision's own kernel, and the multi-scale pooler built on it."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

from elanet.detect.detectors import create_detector
from elanet.detect.roi_align import FastMultiScaleRoIAlign, RoIAlignFunction, roi_align


def _rois(n: int, k: int, image: float, gen: torch.Generator) -> torch.Tensor:
    """Random boxes, some hanging over or lying outside the image, plus the edge cases of the kernel."""
    xy = torch.rand(k, 2, generator=gen) * image * 1.2 - 0.1 * image
    boxes = torch.cat((xy, xy + torch.rand(k, 2, generator=gen) * image * 0.6), 1)
    boxes[0] = torch.tensor([-30.0, -30.0, -20.0, -20.0])  # entirely outside: every sample dropped
    boxes[1] = torch.tensor([image - 1, image - 1, image + 20, image + 20])  # past the bottom-right edge: clamped
    boxes[2] = torch.tensor([5.0, 5.0, 5.2, 5.1])  # smaller than a feature pixel: size 1 without `aligned`
    return torch.cat((torch.randint(0, n, (k, 1), generator=gen).float(), boxes), 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio,out,scale", [(1, 7, 1.0), (2, 7, 0.25), (2, 14, 0.5), (3, 5, 0.125)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_backward_equal_torchvision(aligned: bool, ratio: int, out: int, scale: float, channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(ratio * 100 + out)
    x = torch.randn(3, 6, 13, 11, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    rois = _rois(3, 40, 13 / scale, gen)
    grad = torch.randn(40, 6, out, out, generator=gen)
    ref = tv_roi_align(x, rois, out, scale, ratio, aligned)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    got = roi_align(x, rois, out, scale, ratio, aligned)
    assert got.grad_fn is not None and "RoIAlignFunction" in type(got.grad_fn).__name__
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the same sums in another order
    assert ref.abs().max() > 1.0
    assert got_grad.shape == x.shape and got_grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert ref_grad.abs().max() > 1.0  # the comparison is not between two zero tensors


def test_gradcheck_in_double() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = _rois(2, 6, 12.0, gen).double()
    f = lambda t: RoIAlignFunction.apply(t, rois, 0.5, 3, 3, 2, False)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))


def test_other_cases_go_to_torchvision() -> None:
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]])
    assert "RoIAlignFunction" not in type(roi_align(x, rois, 3, 1.0, -1).grad_fn).__name__  # adaptive sampling
    assert "RoIAlignFunction" not in type(roi_align(x.double(), rois.double(), 3, 1.0, 2).grad_fn).__name__
    empty = roi_align(x, rois[:0], 3, 1.0, 2)
    assert empty.shape == (0, 2, 3, 3)
    traced = torch.jit.trace(lambda t: roi_align(t, rois, 3, 1.0, 2), (x.detach(),))
    assert "torchvision::roi_align" in str(traced.graph)  # a traced graph keeps torchvision's op


def test_inference_takes_the_sparse_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    rois = _rois(2, 30, 32.0, gen)
    ref = tv_roi_align(x, rois, 7, 0.5, 2, False)
    monkeypatch.setattr("elanet.detect.roi_align.tv_roi_align", lambda *a: pytest.fail("went to torchvision"))
    with torch.inference_mode():
        got = roi_align(x, rois, 7, 0.5, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 1.0


@pytest.mark.parametrize("training", [True, False])
def test_multiscale_pooler_equals_torchvision(training: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    feats = OrderedDict((str(i), torch.randn(2, 4, 32 >> i, 32 >> i, generator=gen, requires_grad=True)) for i in range(4))
    boxes = [torch.tensor([[2.0, 3.0, 30.0, 25.0], [10.0, 10.0, 100.0, 120.0], [0.0, 0.0, 127.0, 127.0]]),
             torch.tensor([[50.0, 60.0, 58.0, 70.0], [5.0, 5.0, 60.0, 90.0]])]
    shapes = [(128, 128), (128, 128)]
    grad = torch.randn(5, 4, 7, 7, generator=gen)
    outs = []
    for pool in (MultiScaleRoIAlign(list(feats), 7, 2, canonical_scale=64), FastMultiScaleRoIAlign(list(feats), 7, 2, canonical_scale=64)):
        y = pool.train(training)(feats, boxes, shapes)
        outs.append((y, torch.autograd.grad(y, list(feats.values()), grad, allow_unused=True)))
    (ref, ref_grads), (got, got_grads) = outs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got_grads, ref_grads = ([torch.zeros_like(f) if g is None else g for f, g in zip(feats.values(), gs)]  # an unused level
                            for gs in (got_grads, ref_grads))
    assert sum(bool(g.abs().sum() > 0) for g in ref_grads) >= 2  # the boxes spread over more than one level
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_detectors_use_the_fast_pooler() -> None:
    m = create_detector("mask_rcnn", backbone="resnet18", num_classes=3, fpn_channels=32, box_head_dim=64,
                        mask_head_channels=16, mask_head_convs=1, min_size=64, max_size=64)
    assert isinstance(m.roi_heads.box_roi_pool, FastMultiScaleRoIAlign)
    assert isinstance(m.roi_heads.mask_roi_pool, FastMultiScaleRoIAlign)
