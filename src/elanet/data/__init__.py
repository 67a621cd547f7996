"""Datasets for ``elanet train``: loaders that yield normalised batches on the training device.

Small datasets (scikit-learn ``digits``, ``cifar10``, ``cifar100``) live on the device as uint8 and are
augmented a batch at a time there; ``imagenet`` and ``folder`` are ImageFolder trees read by DataLoader
workers. Augmentation follows SPEC §4. Every loader has ``set_epoch`` (deterministic reshuffle from
``seed`` and the epoch) and shards by ``rank`` / ``world_size``:

- training: every rank gets ``N // world_size`` distinct samples per epoch (the tail of the shuffled order,
  at most ``world_size - 1`` samples, is skipped, like ``DistributedSampler(drop_last=True)``) and a
  partial last batch is dropped (unless it is the only batch);
- test: each sample is seen exactly once across ranks (shards differ by at most one sample); sum the
  correct counts over ranks.

Example::

    data = build_data("cifar10", data_dir="~/data", batch_size=128, device="cuda")
    for epoch in range(epochs):
        data.train.set_epoch(epoch)
        for images, labels in data.train: ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from .cifar import download_cifar, read_cifar, read_digits
from .folder import FolderLoader, Unreadable, eval_transform, read_image_folders, train_transform
from .memory import MemoryLoader, normalize

__all__ = ["DATASETS", "DataBundle", "Loader", "build_data", "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN",
           "IMAGENET_STD"]

DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "folder")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # SPEC §4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Loader(Protocol):
    """What the trainer iterates: ``(images float32 [B, C, H, W], labels int64 [B])`` on the device."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class DataBundle:
    """Train / test loaders of one dataset with what a model and a plot need to know about it."""

    train: Loader
    test: Loader
    num_classes: int
    in_chans: int
    image_size: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _sample: Callable[[int], tuple[Tensor, Tensor]] = field(repr=False, default=None)

    def sample_images(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` test images (whole test set, not a rank's shard), normalised, with labels."""
        return self._sample(n)


def build_data(name: str, *, data_dir: str | None = None, batch_size: int = 128, eval_batch_size: int | None = None,
               device: str | torch.device = "cpu", workers: int = 4, download: bool = False, rank: int = 0,
               world_size: int = 1, seed: int = 0, image_size: int | None = None) -> DataBundle:
    """Build the loaders of dataset ``name`` (one of :data:`DATASETS`).

    Args:
        name: ``digits`` (bundled, ``data_dir`` ignored), ``cifar10`` / ``cifar100`` (torchvision's python
            format under ``data_dir``), ``imagenet`` / ``folder`` (``data_dir/train/<class>/*``,
            ``data_dir/val/<class>/*``).
        data_dir: dataset root.
        batch_size: training batch per rank; ``eval_batch_size`` defaults to it.
        device: where batches (and the in-memory datasets) live.
        workers: DataLoader worker processes (ImageFolder datasets only).
        download: fetch CIFAR with torchvision first (needs internet).
        rank, world_size: this process's shard.
        seed: shuffle and augmentation seed (digits' train/test split is fixed regardless).
        image_size: crop side for ``imagenet`` / ``folder`` (default 224; evaluation resizes to
            ``image_size * 256 / 224`` and centre-crops). Fixed for digits (8) and CIFAR (32).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {eval_batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    device = torch.device(device)
    eval_batch_size = eval_batch_size or batch_size
    shard = dict(rank=rank, world_size=world_size, seed=seed)

    if name in ("digits", "cifar10", "cifar100"):
        native = 8 if name == "digits" else 32
        if image_size not in (None, native):
            raise ValueError(f"{name} images are {native}x{native}; drop image_size={image_size}")
        if download and name == "digits":
            raise ValueError("digits is bundled with scikit-learn; drop --download")
        if name == "digits":
            raw, scale, pad, flip = read_digits(), 16.0, 1, False
            x = torch.from_numpy(raw["x_train"]).double() / scale
            mean, std = (x.mean().item(),), (x.std().item(),)
        else:
            root = _require_dir(name, data_dir, must_exist=not download)
            if download:
                download_cifar(name, root)
            raw, scale, pad, flip = read_cifar(name, root), 255.0, 4, True
            mean, std = CIFAR_MEAN, CIFAR_STD
        xs = {k: torch.from_numpy(raw[k]).to(device) for k in ("x_train", "x_test", "y_train", "y_test")}
        stats = dict(mean=mean, std=std, scale=scale)
        train = MemoryLoader(xs["x_train"], xs["y_train"], batch_size=batch_size, train=True, pad=pad, flip=flip,
                             **stats, **shard)
        test = MemoryLoader(xs["x_test"], xs["y_test"], batch_size=eval_batch_size, **stats, **shard)

        def sample(n: int) -> tuple[Tensor, Tensor]:
            return normalize(xs["x_test"][:n], mean=test.mean, std=test.std, scale=scale), xs["y_test"][:n]

        classes, chans, size = raw["classes"], int(xs["x_train"].shape[1]), native
    else:
        if download:
            raise ValueError(f"{name} cannot be downloaded; place it under data_dir/train and data_dir/val")
        root = _require_dir(name, data_dir)
        size = image_size or 224
        if size < 1:
            raise ValueError(f"image_size must be >= 1, got {size}")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        train_set, val_set = read_image_folders(root)
        common = dict(mean=mean, std=std, device=device, workers=workers, **shard)
        train = FolderLoader(train_set, train_transform(size), batch_size=batch_size, train=True, **common)
        test = FolderLoader(val_set, eval_transform(size), batch_size=eval_batch_size, train=False, **common)

        def sample(n: int) -> tuple[Tensor, Tensor]:
            items = [it for it in (test.dataset[i] for i in range(min(n, len(val_set)))) if not isinstance(it, Unreadable)]
            x = torch.stack([im for im, _ in items]).to(device)
            y = torch.tensor([lab for _, lab in items], dtype=torch.int64, device=device)
            return normalize(x, mean=test.mean, std=test.std, scale=255.0), y

        classes, chans = list(train_set.classes), 3

    return DataBundle(train=train, test=test, num_classes=len(classes), in_chans=chans, image_size=size,
                      classes=classes, mean=tuple(mean), std=tuple(std), _sample=sample)


def _require_dir(name: str, data_dir: str | None, *, must_exist: bool = True) -> Path:
    if not data_dir:
        raise ValueError(f"{name} needs --data-dir (the folder that holds the dataset)")
    root = Path(data_dir).expanduser()
    if must_exist and not root.is_dir():
        raise FileNotFoundError(f"{name}: data_dir {root} does not exist; pass the folder that holds the dataset"
                                + (" or add --download" if name.startswith("cifar") else ""))
    return root
