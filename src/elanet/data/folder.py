"""ImageFolder trees (ImageNet and custom data) read by DataLoader workers and normalised on the device."""
from __future__ import annotations

from pathlib import Path
import sys
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .memory import normalize
from .sharding import derive_seed, num_batches, shard_indices

__all__ = ["train_transform", "eval_transform", "read_image_folders", "EpochSeededDataset", "ShardSampler",
           "FolderLoader", "Unreadable", "collate_readable"]


def train_transform(size: int):
    """SPEC §4 ImageNet training augmentation: RandomResizedCrop(size) + horizontal flip, as uint8 CHW."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])


def eval_transform(size: int):
    """SPEC §4 ImageNet evaluation: resize the short side to size * 256 / 224 (256 for 224), centre crop."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.PILToTensor()])


def read_image_folders(data_dir: str | Path):
    """The ``train`` and ``val`` ImageFolders of ``data_dir`` (untransformed), checked to share classes."""
    from torchvision.datasets import ImageFolder

    root = Path(data_dir).expanduser()
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {' and '.join(s + '/' for s in missing)}; expected "
                                f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg (ImageFolder layout)")
    sets = []
    for split in ("train", "val"):
        try:
            sets.append(ImageFolder(str(root / split)))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{root / split}: no images found ({str(e).splitlines()[0]}); put images "
                                    f"(.jpg, .png, ...) in {root / split}/<class>/") from None
    train, val = sets
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"{root}: train/ and val/ have different classes (only in train: {only_t[:5]}, "
                         f"only in val: {only_v[:5]}); give both splits the same class folders")
    return train, val


class EpochSeededDataset(Dataset):
    """Applies ``transform`` to ``base[i]`` with torch's CPU RNG seeded by ``(seed, epoch, i)``, so a
    sample's augmentation depends only on the run's seed, the epoch and the index -- not on the number
    of workers, the rank or what ran before (resumable). The caller's RNG state is restored."""

    def __init__(self, base: Dataset, transform, *, seed: int = 0) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | Unreadable:
        """The augmented sample, or :class:`Unreadable` naming the file when it cannot be decoded."""
        try:
            img, label = self.base[i]
        except UNREADABLE as e:
            path = self.base.samples[i][0] if hasattr(self.base, "samples") else f"sample {i}"
            return Unreadable(str(path), f"{type(e).__name__}: {e}".splitlines()[0][:200])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(2, self.seed, self.epoch, i))
            return self.transform(img), label


class Unreadable(NamedTuple):
    """A file of the dataset that could not be decoded: left out of its batch, reported once."""

    path: str
    reason: str


def _PIL_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


UNREADABLE = _PIL_errors()  # truncated, empty, non-image and over-large files


def collate_readable(batch: list) -> tuple[tuple[Tensor, Tensor] | None, list[Unreadable]]:
    """``default_collate`` of the readable samples, and the unreadable ones."""
    bad = [b for b in batch if isinstance(b, Unreadable)]
    good = [b for b in batch if not isinstance(b, Unreadable)]
    return (default_collate(good) if good else None), bad


class ShardSampler(Sampler[int]):
    """Indices of one rank for the current epoch (:func:`~elanet.data.sharding.shard_indices`)."""

    def __init__(self, n: int, *, train: bool, rank: int, world_size: int, seed: int) -> None:
        self.n, self.train, self.rank, self.world_size, self.seed, self.epoch = n, train, rank, world_size, seed, 0
        self.start = 0  # first position of the epoch's order to yield (a mid-epoch resume)

    def __iter__(self) -> Iterator[int]:
        idx = shard_indices(self.n, train=self.train, rank=self.rank, world_size=self.world_size,
                            seed=self.seed, epoch=self.epoch)
        return iter(idx[self.start:].tolist())

    def __len__(self) -> int:
        n = self.n // self.world_size if self.train else len(range(self.rank, self.n, self.world_size))
        return max(n - self.start, 0)


class FolderLoader:
    """DataLoader over an ImageFolder that yields normalised float32 batches on ``device``.

    Workers decode and augment to uint8 (4x less host-to-device traffic than float), batches are pinned
    when ``device`` is CUDA and normalised there. A file that cannot be decoded (truncated, not an image)
    is left out of its batch with a one-line warning naming it, once; ``skipped`` maps each to the reason. Training batches are shuffled per epoch, sharded with
    equal sizes and drop a partial last batch; evaluation covers each rank's shard exactly once.
    """

    def __init__(self, base: Dataset, transform, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, train: bool, workers: int = 4, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        self.dataset = EpochSeededDataset(base, transform, seed=seed)
        self.sampler = ShardSampler(len(base), train=train, rank=rank, world_size=world_size, seed=seed)
        self.device = device
        self.skipped: dict[str, str] = {}  # unreadable file -> reason
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", collate_fn=collate_readable,
                                 drop_last=train and len(self.sampler) >= batch_size)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
        self.batch_size, self.train = batch_size, train

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentation draws of ``epoch`` (workers start afresh each pass)."""
        self.dataset.epoch = self.sampler.epoch = epoch

    def __len__(self) -> int:
        return num_batches(len(self.sampler), self.batch_size, drop_last=self.train)

    def iter_from(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of this epoch from batch ``start`` on, equal to ``list(self)[start:]`` without
        reading the skipped images (augmentation depends only on the seed, epoch and index)."""
        n_batches = len(self)
        self.sampler.start = min(start, n_batches) * self.batch_size
        try:
            yield from self._batches(n_batches - min(start, n_batches))
        finally:
            self.sampler.start = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._batches(len(self))

    def _batches(self, count: int) -> Iterator[tuple[Tensor, Tensor]]:
        if count <= 0:
            return
        for k, (batch, bad) in enumerate(self.loader):
            if k == count:  # a resumed epoch: the tail would form one partial batch too many
                break
            for b in bad:
                if b.path not in self.skipped:
                    self.skipped[b.path] = b.reason
                    print(f"warning: skipping unreadable image {b.path} ({b.reason})", file=sys.stderr, flush=True)
            if batch is None:
                raise ValueError(f"every image of a batch is unreadable (e.g. {bad[0].path}): check the dataset files")
            x, y = batch
            x = x.to(self.device, non_blocking=True)
            yield normalize(x, mean=self.mean, std=self.std, scale=255.0), y.to(self.device, non_blocking=True)
