"""Images for the ``elanet viz`` commands: dataset samples, an image file, or the bundled digits image."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import model_info

__all__ = ["Normalisation", "checkpoint_normalisation", "dataset_images", "load_image", "sample_image", "to_display"]


class Normalisation:
    """How a checkpoint's model expects its input: channels, square side, per-channel mean and std (in [0, 1] units)."""

    def __init__(self, in_chans: int, image_size: int, mean: Any, std: Any) -> None:
        self.in_chans, self.image_size = int(in_chans), int(image_size)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(self.in_chans, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(self.in_chans, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def checkpoint_normalisation(ckpt: dict[str, Any]) -> Normalisation:
    """Read ``in_chans``, ``image_size``, ``mean`` and ``std`` from a checkpoint (defaults: the model family's)."""
    info = model_info(ckpt["model_name"])
    size = ckpt.get("image_size") or info["input_size"][-1]
    chans = ckpt.get("in_chans", 3)
    return Normalisation(chans, size, ckpt.get("mean") or [0.5] * chans, ckpt.get("std") or [0.25] * chans)


def to_display(image: Tensor, norm: Normalisation) -> np.ndarray:
    """A normalised ``[C, H, W]`` image back in [0, 1] as ``[H, W]`` (grey) or ``[H, W, 3]``."""
    x = (image.float().cpu() * norm.std + norm.mean).clamp(0, 1)
    return x.permute(1, 2, 0).numpy() if x.shape[0] == 3 else x.mean(0).numpy()


def _fit(x: Tensor, norm: Normalisation) -> Tensor:
    """``[C, H, W]`` in [0, 1] -> centre square crop, resized to ``image_size``, channels adapted."""
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top:top + side, left:left + side]
    if side != norm.image_size:
        x = F.interpolate(x[None], size=(norm.image_size,) * 2, mode="bilinear", align_corners=False,
                          antialias=side > norm.image_size)[0].clamp(0, 1)
    if x.shape[0] != norm.in_chans:
        grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True) if x.shape[0] == 3 else x[:1]
        x = grey.expand(norm.in_chans, -1, -1).clone()
    return x


def load_image(path: str | os.PathLike, norm: Normalisation) -> Tensor:
    """Read an image file (PNG, JPEG, ...) as the model's normalised ``[1, C, H, W]`` input."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} does not exist")
    try:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB" if norm.in_chans == 3 else "L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {p} ({e}): pass a PNG or JPEG file") from None
    x = torch.from_numpy(arr)
    x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]
    return norm(_fit(x, norm))[None]


def dataset_images(ckpt: dict[str, Any], n: int, *, data_dir: str | None = None) -> Tensor:
    """The first ``n`` test images of the checkpoint's dataset, normalised (``elanet.data.build_data``)."""
    from ..data import build_data

    cfg = ckpt.get("config") or {}
    name = cfg.get("dataset") or ckpt.get("dataset")
    if not name:
        raise ValueError("the checkpoint does not say which dataset it was trained on: pass --image FILE")
    data = build_data(name, data_dir=data_dir or cfg.get("data_dir"), batch_size=max(n, 1), device="cpu",
                      workers=0, image_size=cfg.get("image_size"))
    if data.in_chans != ckpt["in_chans"]:
        raise ValueError(f"{name} has {data.in_chans} channels but the model expects {ckpt['in_chans']}")
    return data.sample_images(n)[0]


def sample_image(ckpt: dict[str, Any], *, data_dir: str | None = None) -> Tensor:
    """An image that ships offline, as the model's normalised ``[1, C, H, W]`` input.

    The first test image of the checkpoint's dataset when it can be read; otherwise scikit-image's
    ``chelsea`` (when installed, for models of 64 px or more) or the first scikit-learn digits image.
    """
    norm = checkpoint_normalisation(ckpt)
    try:
        return dataset_images(ckpt, 1, data_dir=data_dir)
    except (ValueError, FileNotFoundError, OSError):
        pass
    if norm.image_size >= 64:
        try:
            from skimage import data as skdata

            x = torch.from_numpy(skdata.chelsea().astype(np.float32) / 255.0).permute(2, 0, 1)
            return norm(_fit(x, norm))[None]
        except ImportError:
            pass
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[0].astype(np.float32) / 16.0)[None]
    return norm(_fit(x, norm))[None]
