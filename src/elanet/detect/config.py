"""Detection run settings: presets (the embedded synthetic job, the paper's COCO recipe), YAML files, flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..training.config import RunConfig, config_from_dict, load_yaml
from .detectors import ANCHOR_SIZES, DETECTORS

__all__ = ["DetectConfig", "DETECT_PRESETS", "resolve_detect_config"]


@dataclass
class DetectConfig(RunConfig):
    """Every setting of a detection run (``model`` is the backbone); saved as the run's ``config.yaml``.

    The learning rate warms up linearly over ``warmup_iters`` optimiser steps from
    ``warmup_ratio * lr`` (MMDetection's linear warm-up), then drops x ``lr_decay`` after each
    epoch in ``milestones``. ``grad_clip`` > 0 clips the gradient norm before every step.
    """

    model: str = "resnet50_ela"
    detector: str = "mask_rcnn"
    data_dir: str | None = None  # a COCO 2017-layout folder; None: the synthetic set in the cache folder
    train_split: str = "train2017"
    val_split: str = "val2017"
    min_size: int = 800  # shorter side after resizing (ratio kept) ...
    max_size: int = 1333  # ... unless the longer side would exceed this
    flip: bool = True
    batch_size: int = 2  # per process
    warmup_epochs: int = 0
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    grad_clip: float = 0.0
    optimizer: str = "sgd"  # sgd (momentum, weight_decay) | adamw (betas 0.9 / 0.999, decoupled weight_decay)
    pretrained: str | None = None  # an elanet classification checkpoint (file or run folder) for the backbone
    keep_mask: bool = False  # start from the pretrained checkpoint's ELA mask instead of all blocks active
    frozen_stages: int | None = None  # default: 1 with --pretrained (stem + layer1), -1 from scratch
    norm_eval: bool | None = None  # default: with --pretrained
    norm: str = "bn"  # bn | gn (GroupNorm in the backbone and FPN)
    drop_path: float = 0.0
    fpn_channels: int = 256  # FPN / RPN / RoI feature width (torchvision's and Table 3's heads: 256)
    box_head_dim: int = 1024  # width of the box head's two fully connected layers (1024)
    mask_head_channels: int = 256  # width of the mask head's convs (256) ...
    mask_head_convs: int = 4  # ... and their number (4)
    roi_canonical_scale: int = 224  # box size whose RoI features come from P4 (FPN eq. 1); smaller: small boxes read deeper levels
    anchor_sizes: list[int] = field(default_factory=lambda: list(ANCHOR_SIZES))  # RPN anchor size on each FPN level P2-P6 (torchvision's: 32 ... 512)
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000  # proposals per image kept for the box head at evaluation (torchvision's 1000)
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    predictions: int = 8  # validation images drawn into predictions/ at the end
    workers: int = 2

    @property
    def dataset(self) -> str:
        """``'synthetic'`` or the data folder's name (used to name the run folder)."""
        return "synthetic" if self.data_dir is None else Path(self.data_dir).name or "coco"

    def validate(self) -> None:
        super().validate()
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}: use one of {', '.join(DETECTORS)}")
        from ..models import model_info

        if model_info(self.model)["family"] != "imagenet":  # unknown names raise with close matches
            raise ValueError(f"{self.model} is a CIFAR classification model and cannot be a detection backbone: pass an "
                             f"ImageNet backbone such as --model resnet50_ela (`elanet models --detectors` lists them)")
        for k in ("batch_size", "min_size", "max_size", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test", "box_batch_size_per_image",
                  "fpn_channels", "box_head_dim", "mask_head_channels", "mask_head_convs", "roi_canonical_scale"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if len(self.anchor_sizes) != 5 or any(a < 1 for a in self.anchor_sizes):
            raise ValueError(f"anchor_sizes needs 5 positive integers, one per FPN level P2-P6 (e.g. [32, 64, 128, 256, 512]), "
                             f"got {list(self.anchor_sizes)}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        if self.warmup_iters < 0 or not 0 < self.warmup_ratio <= 1 or self.grad_clip < 0:
            raise ValueError("warmup_iters and grad_clip must be >= 0 and warmup_ratio in (0, 1]")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if not 0 < self.box_positive_fraction <= 1:
            raise ValueError(f"box_positive_fraction must be in (0, 1], got {self.box_positive_fraction}")
        if self.frozen_stages is not None and not -1 <= self.frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {self.frozen_stages}")
        if self.norm not in ("bn", "gn"):
            raise ValueError(f"norm must be bn or gn, got {self.norm!r}")
        if self.norm == "gn" and self.fpn_channels % 32:
            raise ValueError(f"GroupNorm uses 32 groups: --fpn-channels must be a multiple of 32 with --norm gn, got {self.fpn_channels}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.workers < 0 or self.predictions < 0:
            raise ValueError("workers and predictions must be >= 0")
        if self.keep_mask and self.pretrained is None:
            raise ValueError("--keep-mask keeps the ELA mask of a pretrained checkpoint: pass --pretrained CHECKPOINT too")
        if self.pretrained is not None and not Path(self.pretrained).exists():
            raise FileNotFoundError(f"--pretrained {self.pretrained} does not exist: pass an elanet checkpoint (.pt) or run folder")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise FileNotFoundError(f"--data-dir {self.data_dir} does not exist: pass a folder with annotations/ and "
                                    f"{self.train_split}/ (COCO 2017 layout), or leave it out for the synthetic set")

    def lr_at(self, epoch: int, frac: float = 0.0, *, iteration: int = 0) -> float:
        """Step decay after each milestone epoch, times MMDetection's linear warm-up over the first
        ``warmup_iters`` steps: ``warmup_ratio + (1 - warmup_ratio) * iteration / warmup_iters``."""
        lr = super().lr_at(epoch, frac, iteration=iteration)
        if iteration < self.warmup_iters:
            lr *= self.warmup_ratio + (1.0 - self.warmup_ratio) * iteration / self.warmup_iters
        return lr


_COCO_PRUNING = dict(windows=[[1, 1], [7, 7]], alpha=2.0, beta=5.0, tau=0.2)  # SPEC §3.2-3.3, paper §4.2

DETECT_PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: Mask R-CNN, ELA ResNet-18 from scratch, on the synthetic digits (128x128, ~7 per
    # canvas): 500 steps of batch 4 (2 epochs of 1000 images), KL measured in epoch 1. Without the warm-up and the
    # gradient clipping it diverges in the first iterations (and at lr 0.04 it collapses to AP 0). No flip: a
    # mirrored digit is another glyph. Heads between torchvision's and the lightest: a 128-channel FPN/RPN, a
    # 512-d box head, two 64-channel mask convs (box AP 18.4 with 64/256/2x64, 27.4 with these on the sparser
    # set). 128 sampled RoIs per image: with 32 the box classifier barely learned, with 512 a step cost ~5x more.
    # What lifted the AP from ~25 to ~50 was the set's density (more instances per step), and what paid for
    # the extra steps the parallel RoIAlign backward (detect/roi_align.py). benchmarks/RESULTS.md, detection.
    "synthetic": dict(detector="mask_rcnn", model="resnet18_ela", epochs=2, batch_size=4, lr=0.02, momentum=0.9,
                      weight_decay=1e-4, warmup_iters=100, warmup_ratio=0.001, milestones=[], grad_clip=10.0,
                      min_size=128, max_size=128, flip=False, windows=[[1, 1]], alpha=2.0, beta=5.0, tau=0.2,
                      rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=300, box_batch_size_per_image=128, box_positive_fraction=0.25,
                      fpn_channels=128, box_head_dim=512, mask_head_channels=64, mask_head_convs=2,
                      workers=0, predictions=8),
    # The paper's recipe (MMDetection 1x): SGD 0.02 for a total batch of 16 (8 processes x 2), momentum 0.9,
    # weight decay 1e-4, 500-iteration linear warm-up, lr x0.1 after epochs 8 and 11 of 12, 1333x800 + flip,
    # the COCO pruning preset (KL in epochs 1 and 7, alpha 2, beta 5, tau 0.2), ImageNet-pretrained backbone.
    "coco": dict(detector="mask_rcnn", model="resnet50_ela", epochs=12, batch_size=2, lr=0.02, momentum=0.9,
                 weight_decay=1e-4, warmup_iters=500, warmup_ratio=0.001, milestones=[8, 11], grad_clip=0.0,
                 min_size=800, max_size=1333, flip=True, rpn_post_nms_top_n_train=2000, box_batch_size_per_image=512,
                 box_positive_fraction=0.25, workers=4, **_COCO_PRUNING),
}


def resolve_detect_config(*, preset: str | None = None, config_file: str | None = None,
                          overrides: dict[str, Any] | None = None) -> DetectConfig:
    """Preset (default: ``coco`` with a ``--data-dir``, else ``synthetic``), then YAML, then flags; validated."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    from_file = load_yaml(config_file) if config_file else {}
    name = overrides.pop("preset", None) or preset or from_file.pop("preset", None)
    from_file.pop("preset", None)
    data_dir = overrides.get("data_dir", from_file.get("data_dir"))
    name = name or ("coco" if data_dir else "synthetic")
    if name not in DETECT_PRESETS:
        raise ValueError(f"unknown detection preset {name!r}: use one of {', '.join(DETECT_PRESETS)}")
    source = f"{config_file} / the flags" if config_file else "the flags"
    return config_from_dict(DetectConfig, {**DETECT_PRESETS[name], **from_file, **overrides}, source=source)
