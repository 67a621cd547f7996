"""Detector builder: Table 3 parameter counts, freezing by prefix, BN eval mode, GroupNorm, bad names."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from elanet.attention import MRLABase
from elanet.detect.detectors import create_detector, detector_params

# Table 3 (MMDetection counts: parameters that train with the stem and layer1 frozen), in M
TABLE3 = {("faster_rcnn", "resnet50"): 41.5, ("faster_rcnn", "resnet50_mrla_l"): 41.7, ("faster_rcnn", "resnet50_ela"): 41.7,
          ("faster_rcnn", "resnet101"): 60.5, ("faster_rcnn", "resnet101_ela"): 60.9,
          ("mask_rcnn", "resnet50"): 44.2, ("mask_rcnn", "resnet50_ela"): 44.3,
          ("faster_rcnn", "resnet50_se"): 44.0, ("faster_rcnn", "resnet50_eca"): 41.5, ("faster_rcnn", "resnet50_rla"): 41.8}


@pytest.mark.parametrize("kind,backbone", sorted(TABLE3))
def test_parameter_counts_match_table3(kind: str, backbone: str) -> None:
    n = detector_params(kind, backbone, num_classes=81)
    assert round(n["trainable"] / 1e6, 1) == TABLE3[kind, backbone]
    assert n["total"] > n["trainable"]


def test_ela_minus_plain_matches_table3() -> None:
    for depth, diff in ((50, 0.2), (101, 0.4)):  # Table 3 prints M to one decimal: 41.7 - 41.5 and 60.9 - 60.5
        plain = detector_params("faster_rcnn", f"resnet{depth}")["trainable"]
        ela = detector_params("faster_rcnn", f"resnet{depth}_ela")["trainable"]
        assert round(round(ela / 1e6, 1) - round(plain / 1e6, 1), 1) == diff
        assert 0.1 < (ela - plain) / 1e6 < diff + 0.05  # attention (11C + 2k per block, SPEC §2) and the deep stem


def _frozen(model: nn.Module) -> set[str]:
    return {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if not p.requires_grad}


def test_pretrained_defaults_freeze_stem_and_layer1_and_keep_every_bn_in_eval() -> None:
    m = create_detector("mask_rcnn", backbone="resnet50_ela", num_classes=5, pretrained=True)
    assert _frozen(m) == {"conv1", "bn1", "layer1"}
    body = m.backbone.body
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith(("layer2", "layer3", "layer4")))
    m.train()
    bns = [mod for mod in body.modules() if isinstance(mod, _BatchNorm)]
    attn_bns = [mod.bn for mod in body.modules() if isinstance(mod, MRLABase)]
    assert len(attn_bns) == 16 and all(not b.training for b in bns) and all(not b.training for b in attn_bns)
    assert body.layer2[1].attn.bn.weight.requires_grad  # affine still trains
    assert m.roi_heads.training and m.backbone.fpn.training
    before = body.layer3[0].attn.bn.running_mean.clone()
    m([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4, 40, 40]]), "labels": torch.tensor([1]),
                                    "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}])
    assert torch.equal(body.layer3[0].attn.bn.running_mean, before)  # statistics fixed


def test_from_scratch_trains_everything_and_group_norm_option() -> None:
    m = create_detector("faster_rcnn", backbone="resnet50_ela", num_classes=5)
    assert not _frozen(m)
    m.train()
    assert all(b.training for b in m.backbone.body.modules() if isinstance(b, _BatchNorm))
    gn = create_detector("faster_rcnn", backbone="resnet50", num_classes=5, norm="gn")
    body = gn.backbone.body
    assert not any(isinstance(b, _BatchNorm) for b in body.modules())
    assert isinstance(body.bn1, nn.GroupNorm) and isinstance(body.layer1[0].bn1, nn.GroupNorm)
    assert any(isinstance(b, nn.GroupNorm) for b in gn.backbone.fpn.modules())
    frozen0 = create_detector("faster_rcnn", backbone="resnet50", num_classes=5, pretrained=True, frozen_stages=0)
    assert _frozen(frozen0) == {"conv1", "bn1"}


def test_bad_names() -> None:
    with pytest.raises(ValueError, match="CIFAR classification model.*ImageNet backbone"):
        create_detector("mask_rcnn", backbone="resnet56_ela", num_classes=5)
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        create_detector("yolo", backbone="resnet50", num_classes=5)
    with pytest.raises(ValueError, match="unknown model"):
        create_detector("mask_rcnn", backbone="resnet5O", num_classes=5)
    with pytest.raises(ValueError, match="background"):
        create_detector("mask_rcnn", backbone="resnet50", num_classes=1)


def test_configs_load_and_the_ela_config_is_the_paper_recipe() -> None:
    from pathlib import Path

    from elanet.detect.config import resolve_detect_config

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "coco").glob("*.yaml"))
    # the Table 3 rows elanet builds: Faster R-CNN {plain, SE, ECA, RLA, MRLA-L, DLA, ELA}, Mask R-CNN the same + GC, x
    assert len(files) == 30
    for f in files:
        cfg = resolve_detect_config(config_file=str(f))
        assert f.stem == f"{cfg.detector}_r{cfg.model.removeprefix('resnet')}"
    cfg = resolve_detect_config(config_file=str(files[0].parent / "mask_rcnn_r50_ela.yaml"))
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.warmup_iters, cfg.milestones, cfg.epochs) == (0.02, 0.9, 1e-4, 500, [8, 11], 12)
    assert (cfg.min_size, cfg.max_size, cfg.flip, cfg.windows, cfg.alpha, cfg.beta, cfg.tau) == (800, 1333, True, [[1, 1], [7, 7]], 2.0, 5.0, 0.2)
    assert cfg.lr_at(1, iteration=0) == pytest.approx(0.02 * 0.001) and cfg.lr_at(1, iteration=250) == pytest.approx(0.02 * (0.001 + 0.999 / 2))
    assert cfg.lr_at(9, iteration=10**5) == pytest.approx(0.002) and cfg.lr_at(12, iteration=10**5) == pytest.approx(0.0002)
    heads = (cfg.fpn_channels, cfg.box_head_dim, cfg.mask_head_channels, cfg.mask_head_convs)
    assert heads == (256, 1024, 256, 4) and cfg.box_batch_size_per_image == 512  # Table 3's heads, not the embedded job's


def test_detector_backbone_loads_timm_weights_and_refuses_the_wrong_stem(tmp_path):
    """--pretrained with timm resnet50c weights: the ELA backbone takes them by name, the stem and stage 1 stay
    frozen; torchvision's 7x7-stem weights are refused in one line that names the fix."""
    import timm
    import torchvision

    from elanet.detect.task import load_backbone

    src = timm.create_model("resnet50c", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "r50c.pth")
    model = create_detector("faster_rcnn", backbone="resnet50_ela", num_classes=3, pretrained=True)
    assert load_backbone(model, tmp_path / "r50c.pth", backbone="resnet50_ela", keep_mask=False, frozen_stages=1) is None
    body = model.backbone.body
    assert torch.equal(body.layer3[2].conv2.weight, src.layer3[2].conv2.weight)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "tv50.pth")
    with pytest.raises(ValueError, match="deep stem"):
        load_backbone(model, tmp_path / "tv50.pth", backbone="resnet50_ela", keep_mask=False, frozen_stages=1)


def test_head_sizes_build_torchvision_heads_of_those_widths() -> None:
    """Light heads (the embedded job's): FPN/RPN width C, TwoMLPHead of width D on 7x7 RoIs, N convs of width W
    in MaskRCNNHeads; parameter counts by hand. The defaults stay torchvision's (Table 3's counts above)."""
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    C, D, W, N, K = 64, 256, 64, 2, 11
    m = create_detector("mask_rcnn", backbone="resnet18_ela", num_classes=K, fpn_channels=C, box_head_dim=D,
                        mask_head_channels=W, mask_head_convs=N)
    assert m.backbone.out_channels == C and isinstance(m.roi_heads.box_head, TwoMLPHead)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(m.roi_heads.box_head) == C * 49 * D + D + D * D + D
    assert count(m.roi_heads.box_predictor) == D * K + K + D * 4 * K + 4 * K
    assert isinstance(m.roi_heads.mask_head, MaskRCNNHeads) and len(m.roi_heads.mask_head) == N
    assert count(m.roi_heads.mask_head) == (C * W * 9 + W) + (N - 1) * (W * W * 9 + W)
    assert count(m.roi_heads.mask_predictor) == (W * W * 4 + W) + (W * K + K)  # 2x2 deconv, 1x1 logits
    assert count(m.rpn.head) == (C * C * 9 + C) + (C * 3 + 3) + (C * 12 + 12)  # 3 anchors per place
    m.eval()
    out = m([torch.rand(3, 64, 64)])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}
    default = create_detector("mask_rcnn", backbone="resnet50", num_classes=K)
    assert default.backbone.out_channels == 256 and len(default.roi_heads.mask_head) == 4
    assert default.roi_heads.box_head.fc7.out_features == 1024
    with pytest.raises(ValueError, match="mask_head_convs must be >= 1"):
        create_detector("mask_rcnn", backbone="resnet18", num_classes=K, mask_head_convs=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        create_detector("mask_rcnn", backbone="resnet18", num_classes=K, norm="gn", fpn_channels=48)


def test_anchor_sizes_set_the_rpn_anchors_per_fpn_level() -> None:
    """One anchor size per FPN level P2-P6, three aspect ratios each: the anchors' areas are the sizes squared."""
    from elanet.detect.config import DetectConfig

    m = create_detector("faster_rcnn", backbone="resnet18", num_classes=3, fpn_channels=32, anchor_sizes=(16, 32, 64, 128, 256))
    gen = m.rpn.anchor_generator
    assert gen.sizes == ((16,), (32,), (64,), (128,), (256,)) and gen.num_anchors_per_location() == [3] * 5
    base = gen.cell_anchors[0] if gen.cell_anchors else gen.generate_anchors((16,), (0.5, 1.0, 2.0))
    wh = base[:, 2:] - base[:, :2]
    assert torch.allclose(wh.prod(1), torch.full((3,), 256.0), rtol=0.05)  # 16^2 px at ratios 0.5, 1, 2 (torchvision rounds the corners)
    assert create_detector("faster_rcnn", backbone="resnet18", num_classes=3).rpn.anchor_generator.sizes == \
        ((32,), (64,), (128,), (256,), (512,))  # torchvision's default
    with pytest.raises(ValueError, match="one positive size for each FPN level"):
        create_detector("faster_rcnn", backbone="resnet18", num_classes=3, anchor_sizes=(16, 32))
    # roi_canonical_scale: a box of size s reads level floor(4 + log2(s / scale)), clamped to P2-P5
    for scale, level in ((224, 0), (48, 1), (24, 2)):  # a 30x30 box: P2 by default, P3 at 48, P4 at 24
        m = create_detector("mask_rcnn", backbone="resnet18", num_classes=3, fpn_channels=32, roi_canonical_scale=scale)
        for pool in (m.roi_heads.box_roi_pool, m.roi_heads.mask_roi_pool):
            feats = {str(i): torch.zeros(1, 32, 64 >> i, 64 >> i) for i in range(4)}
            pool(feats, [torch.tensor([[10.0, 10.0, 40.0, 40.0]])], [(256, 256)])  # sets up the level mapper
            assert pool.map_levels([torch.tensor([[10.0, 10.0, 40.0, 40.0]])]).item() == level
    with pytest.raises(ValueError, match="anchor_sizes needs 5"):
        DetectConfig(anchor_sizes=[8, 16, 32]).validate()
    with pytest.raises(ValueError, match="optimizer must be sgd or adamw"):
        DetectConfig(optimizer="adam").validate()
