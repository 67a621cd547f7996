"""The ELA mask: the ``active`` flag of every prunable block, read and written in forward order."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..attention import MRLABase

__all__ = ["ela_blocks", "get_mask", "set_mask"]


def ela_blocks(model: nn.Module) -> list[MRLABase]:
    """The prunable (ELA) attention modules of ``model``, in forward order."""
    return [m for m in model.modules() if isinstance(m, MRLABase) and m.prunable]


def get_mask(model: nn.Module) -> list[bool]:
    """The active flag m_l of every ELA block, in forward order (paper eq. 13)."""
    return [m.active for m in ela_blocks(model)]


def set_mask(model: nn.Module, mask: Sequence[bool]) -> None:
    """Switch ELA blocks on or off; an inactive block does no attention work (paper eq. 16).

    Parameters of a block switched off stop requiring gradients, so optimisers and DDP skip them.

    Raises:
        ValueError: wrong length, a non-boolean entry, or an inactive stage-first block.
    """
    blocks = ela_blocks(model)
    mask = list(mask)
    if not blocks:
        raise ValueError("model has no ELA blocks: build it with an '_ela' name, e.g. 'resnet56_ela'")
    if len(mask) != len(blocks):
        raise ValueError(f"mask has {len(mask)} entries but the model has {len(blocks)} ELA blocks")
    for i, (m, on) in enumerate(zip(blocks, mask)):
        if not isinstance(on, bool) and on not in (0, 1):
            raise ValueError(f"mask entry {i} is {on!r}: use True (active) or False (pruned)")
        if m.first_in_stage and not on:
            raise ValueError(f"block {i} is the first of stage {m.stage_index + 1} and cannot be pruned (m_1 = 1)")
    for m, on in zip(blocks, mask):
        m.active = bool(on)
