"""Faster R-CNN and Mask R-CNN on any registered ImageNet backbone, with an FPN over layer1-4.

Built from torchvision's ``BackboneWithFPN``, ``FasterRCNN`` and ``MaskRCNN``. Stages are frozen
by module prefix (the stem is whatever comes before ``layer1``), so the builder does not depend on
how a backbone names its stem. With a pretrained backbone the MMDetection defaults apply: stem and
``layer1`` frozen, every BatchNorm of the backbone -- the attention modules' included -- kept in
eval mode (running statistics fixed) while the affine parameters of the unfrozen stages train.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..models import create_model, list_models, model_info
from .roi_align import FastMultiScaleRoIAlign

__all__ = ["DETECTORS", "GroupNorm32", "ELABackboneWithFPN", "create_detector", "backbone_names", "stage_prefixes",
           "freeze_stages", "detector_params"]

DETECTORS = ("faster_rcnn", "mask_rcnn")
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # torchvision's and MMDetection's: one size per FPN level P2-P6
_STAGES = ("layer1", "layer2", "layer3", "layer4")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, built like a BatchNorm from the channel count (``norm_layer`` option)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(32, num_channels)


def backbone_names() -> list[str]:
    """Registered models that can serve as detection backbones (the ImageNet ones)."""
    return [n for n in list_models() if model_info(n)["family"] == "imagenet"]


def stage_prefixes(body: nn.Module, frozen_stages: int) -> list[str]:
    """Module-name prefixes to freeze: the stem (every top-level module before ``layer1``), then
    ``layer1`` .. ``layer{frozen_stages}``; none when ``frozen_stages`` is -1 (MMDetection's convention)."""
    if frozen_stages < 0:
        return []
    names = [n for n, _ in body.named_children()]
    stem = names[: names.index("layer1")]
    return stem + list(_STAGES[:frozen_stages])


def freeze_stages(body: nn.Module, frozen_stages: int) -> list[str]:
    """Stop gradients of the stem and the first ``frozen_stages`` stages; returns the prefixes frozen."""
    prefixes = stage_prefixes(body, frozen_stages)
    for name, p in body.named_parameters():
        if any(name == q or name.startswith(q + ".") for q in prefixes):
            p.requires_grad_(False)
    return prefixes


class ELABackboneWithFPN(BackboneWithFPN):
    """``BackboneWithFPN`` that can keep the backbone's BatchNorm layers in eval mode (``norm_eval``).

    With ``norm_eval`` the running statistics of every BatchNorm of the body -- the stages' and the
    attention modules' -- stay fixed in training; their affine parameters still train unless frozen.
    """

    def __init__(self, *args: Any, norm_eval: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.norm_eval = norm_eval

    def train(self, mode: bool = True) -> "ELABackboneWithFPN":
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.body.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


def create_detector(
    kind: str,
    *,
    backbone: str,
    num_classes: int,
    pretrained: bool = False,
    frozen_stages: int | None = None,
    norm_eval: bool | None = None,
    norm: str = "bn",
    drop_path: float = 0.0,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    mask_head_convs: int = 4,
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES,
    roi_canonical_scale: int = 224,
    **kwargs: Any,
) -> GeneralizedRCNN:
    """Build a Faster R-CNN or Mask R-CNN with an FPN (P2-P6) on ``backbone``'s layer1-4.

    The head sizes default to torchvision's (and MMDetection's, so Table 3's): a 256-channel FPN and
    RPN, a two-layer 1024-d MLP box head (``TwoMLPHead``) on 7x7 RoI features and four 3x3 convs of
    256 channels in the mask head (``MaskRCNNHeads``) on 14x14 RoI features. Smaller heads are for
    small images and CPU budgets (the embedded synthetic job); they change the absolute parameter
    count but not the backbone's.

    Args:
        kind: ``'faster_rcnn'`` or ``'mask_rcnn'``.
        backbone: a registered ImageNet model, e.g. ``'resnet50_ela'`` (``elanet models`` lists them).
        num_classes: object classes **plus background**, as torchvision counts them (COCO: 81).
        pretrained: whether the backbone weights will be loaded from a pretrained model; selects the
            MMDetection defaults below. The weights themselves are loaded by the caller.
        frozen_stages: stages frozen with the stem (-1: nothing, 0: stem only). Default 1 when
            ``pretrained`` (stem + layer1), else -1 (everything trains from scratch).
        norm_eval: keep every backbone BatchNorm (attention modules' included) in eval mode. Default
            ``pretrained``.
        norm: ``'bn'`` (BatchNorm) or ``'gn'`` (GroupNorm, 32 groups, in the backbone's stages, stem and
            FPN; the attention modules keep their own BatchNorm). ``'gn'`` is for training from scratch.
        drop_path: DropPath rate on the attention branch.
        min_size, max_size: the shorter / longer side limits of the detector's resize (ratio kept).
        fpn_channels: channels of the FPN outputs, hence of the RPN head and the RoI features.
        box_head_dim: width of the box head's two fully connected layers.
        mask_head_channels: width of the mask head's convs and of its deconvolution.
        mask_head_convs: number of 3x3 convs in the mask head.
        anchor_sizes: the RPN's anchor size (square root of its area, in input pixels) on each of the
            five FPN levels P2-P6, each with aspect ratios 0.5, 1 and 2.
        roi_canonical_scale: box size (input pixels) whose RoI features come from P4; a box of size s
            reads level ``floor(4 + log2(s / roi_canonical_scale))``, clamped to P2-P5 (FPN paper eq. 1;
            torchvision's and MMDetection's 224). Smaller values send small boxes to deeper levels.
        **kwargs: passed on to torchvision's ``FasterRCNN`` / ``MaskRCNN`` (e.g. ``box_batch_size_per_image``).
    """
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}: use one of {', '.join(DETECTORS)}")
    info = model_info(backbone)  # unknown names raise with close matches
    if info["family"] != "imagenet":
        raise ValueError(f"{backbone} is a CIFAR classification model and cannot be a detection backbone: use an ImageNet "
                         f"backbone such as resnet50_ela (`elanet models --detectors` lists them)")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    if norm not in ("bn", "gn"):
        raise ValueError(f"norm must be 'bn' or 'gn', got {norm!r}")
    for name, v in (("fpn_channels", fpn_channels), ("box_head_dim", box_head_dim),
                    ("mask_head_channels", mask_head_channels), ("mask_head_convs", mask_head_convs)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if roi_canonical_scale < 1:
        raise ValueError(f"roi_canonical_scale must be >= 1, got {roi_canonical_scale}")
    if len(anchor_sizes) != 5 or any(a <= 0 for a in anchor_sizes):
        raise ValueError(f"anchor_sizes needs one positive size for each FPN level P2-P6 (5 values), got {list(anchor_sizes)}")
    if norm == "gn" and fpn_channels % 32:
        raise ValueError(f"GroupNorm uses 32 groups: fpn_channels must be a multiple of 32 with norm='gn', got {fpn_channels}")
    frozen_stages = (1 if pretrained else -1) if frozen_stages is None else frozen_stages
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
    norm_eval = pretrained if norm_eval is None else norm_eval
    norm_layer = GroupNorm32 if norm == "gn" else nn.BatchNorm2d
    body = create_model(backbone, num_classes=0, drop_path=drop_path, norm_layer=norm_layer)
    freeze_stages(body, frozen_stages)
    in_channels = [f["num_chs"] for f in body.feature_info]
    fpn = ELABackboneWithFPN(body, {s: str(i) for i, s in enumerate(_STAGES)}, in_channels, fpn_channels,
                             extra_blocks=LastLevelMaxPool(), norm_layer=GroupNorm32 if norm == "gn" else None,
                             norm_eval=norm_eval)
    heads: dict[str, nn.Module] = {"box_head": TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),  # 7x7 RoIAlign
                                   "box_predictor": FastRCNNPredictor(box_head_dim, num_classes)}
    if kind == "mask_rcnn":
        heads["mask_head"] = MaskRCNNHeads(fpn_channels, [mask_head_channels] * mask_head_convs, 1)
        heads["mask_predictor"] = MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes)
    build = MaskRCNN if kind == "mask_rcnn" else FasterRCNN
    anchors = AnchorGenerator(tuple((int(a),) for a in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    levels = ["0", "1", "2", "3"]  # P2-P5 (P6 only feeds the RPN)
    heads["box_roi_pool"] = FastMultiScaleRoIAlign(levels, 7, 2, canonical_scale=roi_canonical_scale)  # torchvision's, faster CPU backward
    if kind == "mask_rcnn":
        heads["mask_roi_pool"] = FastMultiScaleRoIAlign(levels, 14, 2, canonical_scale=roi_canonical_scale)
    model = build(fpn, min_size=min_size, max_size=max_size, rpn_anchor_generator=anchors, **heads, **kwargs)
    model.backbone_name = backbone  # type: ignore[assignment]
    model.kind = kind  # type: ignore[assignment]
    return model


def detector_params(kind: str, backbone: str, *, num_classes: int = 81) -> dict[str, int]:
    """Parameter counts of a detector: ``total``, and ``trainable`` with the pretrained defaults (stem
    and layer1 frozen), which is what MMDetection's complexity tool -- and so Table 3 -- counts."""
    model = create_detector(kind, backbone=backbone, num_classes=num_classes, pretrained=True)
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
