"""Per-forward state: the one mechanism every attention variant attaches through.

A variant is at most three parts (:class:`AttentionParts`), each optional:

- a **block** module, one per residual block (``block.attn``). Class attributes say where it attaches:
  ``position`` is ``"branch"`` (it maps the residual branch after the last BN, before the add: SE, ECA,
  CBAM, BAM, GC, DIA, RLA) or ``"output"`` (it maps the block output after the add and ReLU, and also
  sees the block's projected identity: MRLA-B, ELA, MRLA-L, DLA-L); ``takes_state`` says whether it
  receives the stage's per-forward state; ``input_chs`` is the number of extra channels its
  :meth:`pre` concatenates to the block input (RLA); ``keeps_branch`` says that it keeps its input
  for backward, so the block must not add the identity in place. Modules without these attributes
  (timm's) are stateless branch modules.
- a **stage** context (:class:`StageContext`), one per stage (``stage.context``): it owns the
  parameters the stage's blocks share (registered once) and, for every forward pass, makes the state
  its blocks read and write (:meth:`StageContext.begin`), then hands on what the next stage needs
  (:meth:`StageContext.end`; only variants whose state crosses stages return something).
- a **final** module on the last feature map and the last stage's carry (RLA concatenates its state).

The model threads the carry from stage to stage explicitly. A stage called alone with one tensor
(torchvision's ``IntermediateLayerGetter`` / ``BackboneWithFPN``) makes a fresh state for per-stage
variants, and for cross-stage variants takes the carry its predecessor left in the model's
:class:`Relay` for exactly that output tensor.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

__all__ = ["AttentionParts", "StageContext", "Relay", "attachment"]


@dataclass(frozen=True)
class AttentionParts:
    """Builders of a variant's parts, each called with a channel count (see the module docstring).

    Attributes:
        block: ``(channels) -> nn.Module`` for every residual block, or None.
        stage: ``(channels) -> StageContext`` for every stage (its output channels), or None.
        final: ``(channels) -> nn.Module`` mapping ``(features, carry)`` to the head's features; it
            declares ``extra_chs``, the channels it adds.
    """

    block: Callable[[int], nn.Module] | None = None
    stage: Callable[[int], "StageContext"] | None = None
    final: Callable[[int], nn.Module] | None = None


@dataclass(frozen=True)
class Attachment:
    """Where a block module attaches; read once when the block is built."""

    position: str
    takes_state: bool
    input_chs: int
    keeps_branch: bool


def attachment(module: nn.Module | None) -> Attachment | None:
    """The attachment of a block's attention module (defaults: a stateless branch module)."""
    if module is None:
        return None
    position = getattr(module, "position", "branch")
    if position not in ("branch", "output"):
        raise ValueError(f"{type(module).__name__}.position must be 'branch' or 'output', got {position!r}")
    return Attachment(position, bool(getattr(module, "takes_state", False)), int(getattr(module, "input_chs", 0)),
                      bool(getattr(module, "keeps_branch", False)))


class StageContext(nn.Module):
    """Stage-level part of a variant: shared parameters, and the state of one forward pass.

    Subclasses override :meth:`begin` (and :meth:`end` when ``crosses_stages``).
    """

    crosses_stages: bool = False  # whether the state continues into the next stage (RLA)

    def begin(self, blocks: list[nn.Module], x: Tensor, carry: Any) -> Any:
        """The state the stage's blocks share for this forward pass.

        Args:
            blocks: the stage's blocks, in order.
            x: the stage input.
            carry: what the previous stage's :meth:`end` returned (None at the first stage, and
                always None unless ``crosses_stages``).
        """
        return None

    def end(self, state: Any) -> Any:
        """What the next stage's :meth:`begin` receives (None: nothing crosses the boundary)."""
        return None


class Relay:
    """Hands a cross-stage carry from one stage to the next when stages are called one by one.

    The carry is tied to the tensor the stage returned (held weakly): the next stage accepts it only
    for that very tensor, so a stale state from another forward pass can never leak in.
    """

    def __init__(self, num_stages: int) -> None:
        self.num_stages = num_stages
        self._clear()

    def _clear(self) -> None:
        self._index, self._ref, self._carry = -1, None, None

    def take(self, index: int, x: Tensor) -> Any:
        if index == 0:
            self._clear()
            return None
        ok = self._index == index - 1 and self._ref is not None and self._ref() is x
        carry = self._carry
        self._clear()
        if not ok:
            raise ValueError(
                f"stage {index + 1} continues the recurrent state of stage {index}: call the stages in order, each "
                f"on the previous one's output (as the model and IntermediateLayerGetter do)"
            )
        return carry

    def put(self, index: int, x: Tensor, carry: Any) -> None:
        if index + 1 < self.num_stages:
            self._index, self._ref, self._carry = index, weakref.ref(x), carry

    def __getstate__(self) -> dict:  # a weak reference cannot be pickled or copied; the carry is per-forward anyway
        return {"num_stages": self.num_stages}

    def __setstate__(self, state: dict) -> None:
        self.num_stages = state["num_stages"]
        self._clear()
