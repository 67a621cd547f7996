"""The layer-attention variants as parts: MRLA-L, MRLA-B and ELA (paper eq. 5, 7, 16; SPEC §2-3).

MRLA-B / ELA keep the keys and values of a stage's active blocks in a :class:`LayerMemory` that
the stage context makes afresh for every forward pass; MRLA-L needs no state.
"""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from .aggregate import LayerMemory
from .context import AttentionParts, StageContext
from .mrla import MRLABase, MRLALight

__all__ = ["StageMemory", "mrla_l", "mrla_b", "ela"]


class StageMemory(StageContext):
    """MRLA-B's stage state: a key/value memory sized for the stage's active blocks (eq. 5, 16)."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def begin(self, blocks: list[nn.Module], x: Tensor, carry: None) -> LayerMemory:
        active = sum(isinstance(getattr(b, "attn", None), MRLABase) and b.attn.active for b in blocks)
        return LayerMemory(capacity=active)  # its value buffer is allocated once, for the active blocks


def mrla_l(*, head_dim: int = 32, drop_path: float = 0.0) -> AttentionParts:
    """MRLA-L: a light layer-attention module after every block (eq. 7)."""
    return AttentionParts(block=partial(MRLALight, head_dim=head_dim, drop_path=drop_path))


def mrla_b(*, head_dim: int = 32, drop_path: float = 0.0) -> AttentionParts:
    """MRLA-B: every block attends over the earlier blocks of its stage (eq. 5)."""
    return AttentionParts(block=partial(MRLABase, head_dim=head_dim, drop_path=drop_path), stage=StageMemory)


def ela(*, head_dim: int = 32, drop_path: float = 0.0) -> AttentionParts:
    """ELA: MRLA-B whose blocks can be pruned (eq. 16)."""
    return AttentionParts(block=partial(MRLABase, head_dim=head_dim, drop_path=drop_path, prunable=True), stage=StageMemory)
