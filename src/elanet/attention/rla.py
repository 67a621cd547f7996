"""RLA, recurrent layer aggregation (Zhao et al., RLA-Net, NeurIPS 2021), as in ``fangyanwen1106/RLANet``
(SPEC §6): a small recurrent state runs beside the whole backbone."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .context import AttentionParts, StageContext

__all__ = ["RLAShared", "RLAStep", "RLAFinal", "rla"]


class RLAShared(StageContext):
    """The stage's shared RLA convs and the recurrent state h, which continues across stages.

    Every block of the stage updates ``h <- conv3x3(tanh(BN_t(h + conv1x1(y_t))))`` (RLA-Net eq. 5-6,
    y_t the block's branch), with the 1x1 and 3x3 convs shared by the stage. h starts at zero before
    the first stage and is not reset between stages.
    """

    crosses_stages = True

    def __init__(self, channels: int, *, rla_channels: int = 32) -> None:
        super().__init__()
        self.rla_channels = rla_channels
        self.conv_out = nn.Conv2d(channels, rla_channels, 1, bias=False)
        self.recurrent = nn.Conv2d(rla_channels, rla_channels, 3, padding=1, bias=False)

    def begin(self, blocks: list[nn.Module], x: Tensor, carry: Tensor | None) -> dict:
        if carry is None:
            carry = x.new_zeros((x.shape[0], self.rla_channels, *x.shape[2:]))
        return {"shared": self, "h": carry}

    def end(self, state: dict) -> Tensor:
        return state["h"]


class RLAStep(nn.Module):
    """A block's part of RLA: the block reads ``[x, h]`` (its first conv takes ``rla_channels`` more
    inputs) and, from its branch y, updates h with its own BN (RLA-Net eq. 5-6). The branch passes
    through unchanged. At a stride-2 block h is average-pooled to the new resolution first.
    """

    position = "branch"
    takes_state = True
    keeps_branch = True  # the shared 1x1 conv keeps y for backward: the block must not add in place

    def __init__(self, channels: int, *, rla_channels: int = 32) -> None:
        super().__init__()
        self.input_chs = rla_channels
        self.bn = nn.BatchNorm2d(rla_channels)

    def init_pretrained_start(self) -> float:
        """The branch passes unchanged; what the state adds enters through the block's first conv, whose
        ``input_chs`` extra input weights the loader zeroes (``init_attention``), so the start is exact."""
        return 1.0

    def pre(self, x: Tensor, state: dict) -> Tensor:
        return torch.cat((x, state["h"]), dim=1)

    def forward(self, y: Tensor, state: dict) -> Tensor:
        shared: RLAShared = state["shared"]
        h = state["h"]
        if h.shape[-2:] != y.shape[-2:]:
            h = F.avg_pool2d(h, 2, ceil_mode=True)
        state["h"] = shared.recurrent(torch.tanh(self.bn(h + shared.conv_out(y))))
        return y


class RLAFinal(nn.Module):
    """The head's features: ``[x, relu(BN(h))]``, the last feature map and the final state (RLA-Net)."""

    def __init__(self, channels: int, *, rla_channels: int = 32) -> None:
        super().__init__()
        self.extra_chs = rla_channels
        self.bn = nn.BatchNorm2d(rla_channels)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.cat((x, F.relu(self.bn(h))), dim=1)


def rla(*, rla_channels: int = 32) -> AttentionParts:
    """RLA on the ImageNet bottleneck ResNets."""
    return AttentionParts(block=partial(RLAStep, rla_channels=rla_channels),
                          stage=partial(RLAShared, rla_channels=rla_channels),
                          final=partial(RLAFinal, rla_channels=rla_channels))
