"""COCO-format instance data: the 2017 layout, a checked reader, flip augmentation and a sharded loader.

A dataset folder holds ``annotations/instances_<split>.json`` and ``<split>/`` (COCO 2017:
``train2017``, ``val2017``). The annotation file is checked when it is read, so a bad input stops
with a one-line error naming the file and the fix before anything is written. Boxes are COCO
``[x, y, w, h]``; masks may be polygons, uncompressed or compressed RLE. Resizing (shorter / longer
side limits, ratio kept) is done by the detector's own ``GeneralizedRCNNTransform``, which also maps
predictions back to the original image size; the reader only flips.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from ..data.sharding import derive_seed, num_batches, shard_indices

__all__ = ["coco_paths", "read_coco_json", "CocoDetection", "DetectionLoader", "collate"]


def coco_paths(data_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split`` in a COCO 2017-layout folder, both checked."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root} does not exist: pass a folder with annotations/ and {split}/ (COCO 2017 layout)")
    ann = root / "annotations" / f"instances_{split}.json"
    images = root / split
    if not ann.is_file():
        raise FileNotFoundError(f"{ann} not found: --data-dir must hold the COCO 2017 layout (annotations/instances_{split}.json and {split}/)")
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} not found: --data-dir must hold {split}/ beside annotations/")
    return ann, images


def read_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """Load an instances file and check its structure and cross-references (one-line ``ValueError``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): fix or re-download the annotation file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text JSON file: pass a COCO instances_*.json annotation file") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(f"{path} is not a COCO instances file: it needs 'images', 'annotations' and 'categories' lists")
    try:
        image_ids = {int(im["id"]) for im in doc["images"]}
        cat_ids = {int(c["id"]) for c in doc["categories"]}
        for im in doc["images"]:
            im["file_name"], im["width"], im["height"]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: every image needs id, file_name, width, height and every category an id") from None
    if not cat_ids:
        raise ValueError(f"{path} lists no categories: add the 'categories' of the dataset")
    for a in doc["annotations"]:
        if not isinstance(a, dict) or not {"image_id", "category_id", "bbox"} <= a.keys():
            raise ValueError(f"{path}: annotation {a.get('id') if isinstance(a, dict) else a!r} lacks image_id, category_id or bbox")
        if a["image_id"] not in image_ids:
            raise ValueError(f"{path}: annotation {a.get('id')} refers to image_id {a['image_id']}, which is not in 'images': fix or remove it")
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{path}: annotation {a.get('id')} has category_id {a['category_id']}, which is missing from 'categories': "
                             f"add it there or fix the annotation")
        if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4):
            raise ValueError(f"{path}: annotation {a.get('id')} has bbox {a['bbox']!r}: COCO boxes are [x, y, width, height]")
    return doc


def _decode_mask(seg: Any, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    else:  # compressed RLE
        rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
    return mask_utils.decode(rle)


class CocoDetection(torch.utils.data.Dataset):
    """Images and torchvision detection targets from a COCO instances file.

    Labels are contiguous (1..K in the order of ``categories`` sorted by id; 0 is background).
    Crowd annotations are left out of the training targets (COCOeval still uses them), and boxes
    narrower or shorter than one pixel after clipping to the image are dropped and counted in
    ``dropped``. Images without objects are kept, with empty targets.

    Args:
        ann_file: ``instances_*.json``.
        image_dir: folder of the images named in ``file_name``.
        masks: decode instance masks into ``target['masks']`` (uint8 ``[N, H, W]``).
        flip: horizontal flip with probability 0.5, decided from ``(seed, epoch, index)``.
        seed: seed of the flip decisions.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, *, masks: bool = True,
                 flip: bool = False, seed: int = 0) -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        doc = read_coco_json(self.ann_file)
        self.images = sorted(doc["images"], key=lambda im: im["id"])
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self.classes = [str(c.get("name", c["id"])) for c in cats]
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        missing = [im["file_name"] for im in self.images if not (self.image_dir / im["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.ann_file}: {len(missing)} image(s) listed there are missing from {self.image_dir} "
                                    f"(first: {missing[0]}): point --data-dir at the folder holding them")
        if masks and doc["annotations"] and not any(a.get("segmentation") for a in doc["annotations"]):
            raise ValueError(f"{self.ann_file} has boxes but no instance masks ('segmentation'): train a box-only detector "
                             f"(--detector faster_rcnn) or add masks")
        self.masks, self.flip, self.seed, self.epoch = masks, flip, seed, 0
        size = {im["id"]: (im["height"], im["width"]) for im in self.images}
        self._anns: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        self.dropped = self.crowd = 0
        for a in doc["annotations"]:
            if a.get("iscrowd", 0):
                self.crowd += 1
                continue
            h, w = size[a["image_id"]]
            x, y, bw, bh = (float(v) for v in a["bbox"])
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if x2 - x1 < 1 or y2 - y1 < 1 or (masks and not a.get("segmentation")):
                self.dropped += 1
                continue
            self._anns[a["image_id"]].append({"box": [x1, y1, x2, y2], "label": label_of[a["category_id"]],
                                              "segmentation": a.get("segmentation")})

    @property
    def num_classes(self) -> int:
        """Object classes plus background, as torchvision's detectors count them."""
        return len(self.category_ids) + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, index: int) -> Tensor:
        """The image as float ``[3, H, W]`` in [0, 1]."""
        from PIL import Image

        im = self.images[index]
        with Image.open(self.image_dir / im["file_name"]) as f:
            img = torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1)
        if tuple(img.shape[1:]) != (im["height"], im["width"]):
            raise ValueError(f"{self.ann_file}: image {im['file_name']} is {img.shape[2]}x{img.shape[1]} but listed as "
                             f"{im['width']}x{im['height']}: fix its width/height")
        return img.float().div_(255)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        im = self.images[index]
        img = self.read_image(index)
        h, w = im["height"], im["width"]
        anns = self._anns[im["id"]]
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
                  "image_id": torch.tensor(im["id"])}
        if self.masks:
            m = np.stack([_decode_mask(a["segmentation"], h, w) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = torch.from_numpy(m)
        if self.flip and np.random.default_rng(derive_seed(2, self.seed, self.epoch, index)).random() < 0.5:
            img = img.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return img, target


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Detection batches are lists: images differ in size."""
    return [b[0] for b in batch], [b[1] for b in batch]


@dataclass
class DetectionLoader:
    """Batches of one rank, reshuffled per epoch from ``seed`` (the same order on every rank).

    ``iter_from(k)`` skips the first ``k`` batches without reading them (mid-epoch resume).
    Training drops a partial last batch; evaluation visits each image exactly once across ranks.
    """

    dataset: CocoDetection
    batch_size: int
    train: bool
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    workers: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        idx = shard_indices(len(self.dataset), train=self.train, rank=self.rank, world_size=self.world_size,
                            seed=self.seed, epoch=self.epoch).tolist()
        n = num_batches(len(idx), self.batch_size, drop_last=self.train)
        return [idx[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)]

    def __len__(self) -> int:
        return len(self._batches())

    def iter_from(self, start: int = 0) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
        batches = self._batches()[start:]
        if not batches:
            return iter(())
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                                                num_workers=self.workers, persistent_workers=False))

    def __iter__(self) -> Iterator[tuple[list[Tensor], list[dict[str, Tensor]]]]:
        return self.iter_from(0)
