"""Small datasets held on the device as uint8 and augmented a whole batch at a time."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .sharding import derive_seed, num_batches, shard_indices

__all__ = ["crop_flip_params", "crop_flip", "normalize", "MemoryLoader"]


def crop_flip_params(batch: int, *, pad: int, flip: bool, generator: torch.Generator,
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random-crop offsets ``(top, left)`` in ``[0, 2 * pad]`` and flip flags, drawn on the
    generator's device."""
    dev = generator.device
    top = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=dev)
    left = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=dev)
    if flip:
        mirror = torch.randint(0, 2, (batch,), generator=generator, device=dev).bool()
    else:
        mirror = torch.zeros(batch, dtype=torch.bool, device=dev)
    return top, left, mirror


def crop_flip(x: Tensor, *, pad: int, top: Tensor, left: Tensor, mirror: Tensor) -> Tensor:
    """Zero-pad ``x`` [B, C, H, W] by ``pad`` once, then take for every sample the H x W window at
    ``(top[b], left[b])`` of the padded image, mirrored left-right where ``mirror[b]``.

    One gather does all crops and flips: the column index of output pixel j is ``left + j`` or, when
    mirrored, ``left + W - 1 - j``. Equal to ``torchvision`` ``RandomCrop(H, padding=pad)`` followed
    by ``RandomHorizontalFlip`` with the same draws. Works on any dtype (uint8 keeps traffic small).
    """
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    j = torch.arange(w, device=x.device)
    cols = left[:, None] + torch.where(mirror[:, None], w - 1 - j, j)  # [B, W]
    rows = top[:, None] + torch.arange(h, device=x.device)  # [B, H]
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = xp[bi, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def normalize(x: Tensor, *, mean: Tensor, std: Tensor, scale: float) -> Tensor:
    """``(x / scale - mean) / std`` in float32; ``mean``/``std`` broadcast as [1, C, 1, 1].

    The result has the canonical NCHW strides. A one-channel batch gathered from a NumPy view can have
    strides that also read as channels-last; convolutions then propagate channels-last and produce
    depthwise weight gradients ([C, 1, k, k]) whose strides differ from the weights', which DDP copies
    with a "Grad strides do not match bucket view strides" warning on every rank.
    """
    return x.to(torch.float32, memory_format=torch.contiguous_format, copy=True).mul_(1.0 / (scale * std)).sub_(mean / std)


class MemoryLoader:
    """Batches of a dataset held on one device as a uint8 tensor.

    Args:
        images: uint8 [N, C, H, W] on the target device (raw pixel values, ``scale`` is white).
        labels: int64 [N] on the same device.
        batch_size: samples per batch (for this rank).
        mean, std: per-channel normalisation in units of ``pixel / scale``.
        scale: pixel value of white (255 for 8-bit images, 16 for scikit-learn digits).
        train: shuffle each epoch, shard with equal sizes, drop a partial last batch, augment.
        pad, flip: augmentation, random crop back to H x W after zero-padding by ``pad`` and random
            horizontal flip (train only).
        rank, world_size, seed: sharding and randomness, see :func:`~elanet.data.sharding.shard_indices`.
            Augmentation draws come from a generator seeded by ``(seed, epoch, rank)`` at the start of
            every pass, so a pass over one epoch is reproducible on its own (resume needs only
            :meth:`set_epoch`).
    """

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], scale: float = 255.0, train: bool = False, pad: int = 0,
                 flip: bool = False, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.scale, self.train = batch_size, scale, train
        self.pad, self.flip = pad, flip
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(shape)
        n = len(images)
        self.num_samples = n // world_size if train else len(range(rank, n, world_size))

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, drop_last=self.train)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of this epoch from batch ``start`` on, equal to ``list(self)[start:]`` (the skipped
        batches' augmentation draws are made and dropped, so the stream lines up)."""
        dev = self.images.device
        idx = shard_indices(len(self.images), train=self.train, rank=self.rank, world_size=self.world_size,
                            seed=self.seed, epoch=self.epoch).to(dev)
        augment = self.train and (self.pad > 0 or self.flip)
        if augment:
            g = torch.Generator(device=dev).manual_seed(derive_seed(1, self.seed, self.epoch, self.rank))
        for i in range(len(self)):
            sel = idx[i * self.batch_size:(i + 1) * self.batch_size]
            if augment:
                top, left, mirror = crop_flip_params(len(sel), pad=self.pad, flip=self.flip, generator=g)
            if i < start:
                continue
            x = self.images[sel]
            if augment:
                x = crop_flip(x, pad=self.pad, top=top, left=left, mirror=mirror)
            yield normalize(x, mean=self.mean, std=self.std, scale=self.scale), self.labels[sel]
