"""Deterministic per-epoch shuffling and rank sharding shared by every loader."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["derive_seed", "shard_indices", "num_batches"]


def derive_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers (e.g. ``tag, seed, epoch, rank``) by NumPy's
    SeedSequence, so neighbouring inputs give unrelated streams (``seed + epoch`` would not)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> 1)


def shard_indices(n: int, *, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0,
                  epoch: int = 0) -> Tensor:
    """Sample indices (int64, CPU) that ``rank`` visits in ``epoch``.

    Training: one permutation of ``range(n)`` shared by all ranks (seeded by ``seed`` and ``epoch``),
    cut to ``world_size * (n // world_size)`` entries and dealt round-robin, so every rank gets the same
    number of distinct samples and at most ``world_size - 1`` samples are skipped per epoch (a different
    few each epoch) -- ``DistributedSampler(drop_last=True)`` behaviour. Evaluation: no shuffle, no loss,
    ``range(n)[rank::world_size]``; shards differ in length by at most one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if not train:
        return torch.arange(rank, n, world_size, dtype=torch.int64)
    g = torch.Generator().manual_seed(derive_seed(0, seed, epoch))
    perm = torch.randperm(n, generator=g)
    return perm[: world_size * (n // world_size)][rank::world_size]


def num_batches(n: int, batch_size: int, *, drop_last: bool) -> int:
    """Batches of ``n`` samples; ``drop_last`` drops a partial tail batch unless it is the only one."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)
