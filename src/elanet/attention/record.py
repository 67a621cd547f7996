"""Recording the layer-attention distributions of a forward pass."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from torch import Tensor, nn

__all__ = ["AttentionRecord", "record_attention"]


@dataclass
class AttentionRecord:
    """What :func:`record_attention` collected, in forward order.

    Attributes:
        weights: per active block, its attention distribution ``[B, heads, n]`` over the active
            layers of its stage so far (itself last), detached.
        blocks: per entry, the block's index among the model's layer-attention blocks.
        stages: per entry, the index of the stage the block belongs to.
    """

    weights: list[Tensor] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    stages: list[int] = field(default_factory=list)

    def add(self, block: int, stage: int, weights: Tensor) -> None:
        self.weights.append(weights.detach())
        self.blocks.append(block)
        self.stages.append(stage)

    def clear(self) -> None:
        self.weights.clear()
        self.blocks.clear()
        self.stages.clear()


@contextmanager
def record_attention(model: nn.Module) -> Iterator[AttentionRecord]:
    """Record the attention distribution of every active MRLA-B / ELA block while inside.

    Example:
        >>> with elanet.record_attention(model) as rec:
        ...     model(images)
        >>> rec.weights[0].shape  # [batch, heads, active layers so far]

    Outside the context the blocks keep nothing.
    """
    from .mrla import MRLABase

    modules = [m for m in model.modules() if isinstance(m, MRLABase)]
    if not modules:
        raise ValueError("model has no MRLA-B / ELA blocks to record: build it with a '_mrla_b' or '_ela' name")
    rec = AttentionRecord()
    previous = [m.recorder for m in modules]
    for m in modules:
        m.recorder = rec
    try:
        yield rec
    finally:
        for m, p in zip(modules, previous):
            m.recorder = p
