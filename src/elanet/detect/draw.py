"""Predictions drawn on images with torchvision's ``draw_bounding_boxes`` and ``draw_segmentation_masks``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["draw_prediction", "save_image"]


def draw_prediction(image: Tensor, pred: dict[str, Tensor], classes: Sequence[str], *, score_threshold: float = 0.5,
                    mask_threshold: float = 0.5) -> Tensor:
    """``image`` (float ``[3, H, W]`` in [0, 1]) with the boxes, labels, scores and masks of ``pred``
    scoring at least ``score_threshold``; returns uint8 ``[3, H, W]``."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    img = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    keep = pred["scores"] >= score_threshold
    if not keep.any():
        return img
    labels = pred["labels"][keep].tolist()
    colours = [_colour(i) for i in labels]
    if "masks" in pred:
        img = draw_segmentation_masks(img, pred["masks"][keep][:, 0] > mask_threshold, alpha=0.45, colors=colours)
    text = [f"{classes[i - 1] if 0 < i <= len(classes) else i} {s:.2f}" for i, s in zip(labels, pred["scores"][keep].tolist())]
    return draw_bounding_boxes(img, pred["boxes"][keep], labels=text, colors=colours, width=max(1, min(img.shape[1:]) // 200))


def save_image(img: Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 ``[3, H, W]`` image (PNG or JPEG, by the suffix)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    return path


def _colour(label: int) -> tuple[int, int, int]:
    """A stable, distinct colour per label (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)
