"""The embedded detection set: scikit-learn's digits pasted on noisy canvases, written in COCO format.

Every image is a 128x128 canvas with a noisy colour gradient holding non-overlapping digits (6-10
tried, 4-9 placed, 6.8 on average: dense canvases give the detector more instances per step), each
upscaled (3-5x, bilinear) and tinted with a random colour; the instance mask is where the glyph's
intensity exceeds ``MASK_LEVEL``. The set is written to a cache folder in the COCO 2017
layout (``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``) so that the
same reader as for real COCO data runs on it. Train and val are split by *source digit*: the 8x8
glyphs pasted into the validation images never appear in a training image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..runtime import default_cache_dir

__all__ = ["SYNTHETIC_VERSION", "default_cache_dir", "make_synthetic_coco", "MASK_LEVEL"]

SYNTHETIC_VERSION = "digits-coco-v3"
MASK_LEVEL = 0.3  # glyph intensity (0-1) above which a pixel belongs to the instance
_CANVAS = 128
_SPLITS = {"train2017": 1000, "val2017": 100}  # images per split: 250 steps of batch 4 per epoch
_VAL_SOURCE_FRACTION = 0.25  # last quarter of the 1797 source glyphs is reserved for val
_DIGITS = (6, 10)  # digits tried per canvas, inclusive; one that finds no free place in 50 tries is left out (6.8 placed on average)


def _upscale(glyph: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upscaling of an 8x8 glyph (values 0-1) to ``size`` x ``size``, align-corners style."""
    src = np.linspace(0, glyph.shape[0] - 1, size)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, glyph.shape[0] - 1)
    f = src - i0
    rows = glyph[i0] * (1 - f)[:, None] + glyph[i1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]


def _background(rng: np.random.RandomState) -> np.ndarray:
    c0, c1 = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:_CANVAS, 0:_CANVAS] / (_CANVAS - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / (t.max() - t.min())
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    return img + rng.normal(0.0, 0.06, img.shape)


def _image(rng: np.random.RandomState, glyphs: np.ndarray, labels: np.ndarray, pool: np.ndarray):
    """One canvas and its instances ``(label, mask)``; digits are placed without overlapping boxes."""
    img = _background(rng)
    boxes: list[tuple[int, int, int, int]] = []
    instances = []
    for _ in range(rng.randint(_DIGITS[0], _DIGITS[1] + 1)):
        for _attempt in range(50):
            size = rng.randint(24, 41)
            x, y = rng.randint(0, _CANVAS - size + 1), rng.randint(0, _CANVAS - size + 1)
            if all(x + size + 2 <= bx or bx + bs + 2 <= x or y + size + 2 <= by or by + bs + 2 <= y for bx, by, bs, _ in boxes):
                break
        else:
            continue
        k = pool[rng.randint(len(pool))]
        alpha = np.clip(_upscale(glyphs[k], size), 0.0, 1.0)
        region = img[y:y + size, x:x + size]
        for _attempt in range(20):  # a tint that stands out from the background under it
            colour = rng.uniform(0.0, 1.0, 3)
            if np.linalg.norm(colour - region.mean((0, 1))) > 0.45:
                break
        img[y:y + size, x:x + size] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = np.zeros((_CANVAS, _CANVAS), dtype=np.uint8)
        mask[y:y + size, x:x + size] = alpha > MASK_LEVEL
        boxes.append((x, y, size, k))
        instances.append((int(labels[k]), mask))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), instances


def make_synthetic_coco(root: str | os.PathLike | None = None, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the synthetic set (deterministic in ``seed``) and return its folder.

    The folder is ``root/<SYNTHETIC_VERSION>-seed<seed>`` (``root`` defaults to
    :func:`default_cache_dir`). An existing complete set is reused; it is written to a temporary
    folder first and renamed, so an interrupted write never leaves a half set behind.
    """
    from PIL import Image
    from pycocotools import mask as mask_utils
    from sklearn.datasets import load_digits

    out = Path(root or default_cache_dir()) / f"{SYNTHETIC_VERSION}-seed{seed}"
    if out.is_dir() and (out / "annotations" / "instances_val2017.json").is_file() and not overwrite:
        return out
    digits = load_digits()
    glyphs = digits.images.astype(np.float64) / 16.0
    n_val_src = int(len(glyphs) * _VAL_SOURCE_FRACTION)
    sources = {"train2017": np.arange(len(glyphs) - n_val_src), "val2017": np.arange(len(glyphs) - n_val_src, len(glyphs))}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    (tmp / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    for s, (split, n_images) in enumerate(_SPLITS.items()):
        rng = np.random.RandomState([seed, s])
        (tmp / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(n_images):
            img, instances = _image(rng, glyphs, digits.target, sources[split])
            name = f"{i:06d}.png"
            Image.fromarray(img).save(tmp / split / name)
            images.append({"id": i + 1, "file_name": name, "width": _CANVAS, "height": _CANVAS})
            for label, mask in instances:
                rle = mask_utils.encode(np.asfortranarray(mask))
                x, y, w, h = mask_utils.toBbox(rle).tolist()
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1, "iscrowd": 0,
                    "bbox": [x, y, w, h], "area": float(mask_utils.area(rle)),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                })
        doc = {"info": {"description": f"elanet synthetic digits ({SYNTHETIC_VERSION}, seed {seed})"},
               "images": images, "annotations": annotations, "categories": categories}
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    import shutil

    if overwrite and out.exists():
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:  # another process (e.g. another rank) finished writing the same set first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "annotations" / "instances_val2017.json").is_file():
            raise
    return out
