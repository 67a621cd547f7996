"""BAM, the bottleneck attention module (Park et al., BMVC 2018), after every block's last BN (SPEC §6)."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .context import AttentionParts

__all__ = ["BAM", "bam"]


class BAM(nn.Module):
    """``F' = F * (1 + sigmoid(M_c(F) + M_s(F)))`` (BAM eq. 1-4).

    Channel branch ``M_c``: global average pool, then ``C -> C/r`` (BN, ReLU) ``-> C``. Spatial
    branch ``M_s``: 1x1 conv ``C -> C/r``, two 3x3 convs with dilation ``d``, 1x1 conv to one map, each
    conv but the last followed by BN and ReLU. The two maps broadcast to ``C x H x W`` and add.

    Args:
        channels: channels C of the branch.
        reduction: r, the reduction of both branches.
        dilation: d of the two 3x3 convs.
    """

    def __init__(self, channels: int, *, reduction: int = 16, dilation: int = 4) -> None:
        super().__init__()
        mid = channels // reduction
        if mid < 1:
            raise ValueError(f"BAM needs channels ({channels}) >= reduction ({reduction}): lower the reduction")
        self.channel = nn.Sequential(
            nn.Linear(channels, mid), nn.BatchNorm1d(mid), nn.ReLU(inplace=True), nn.Linear(mid, channels))

        def cbr(i: int, o: int, k: int, d: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, k, padding=d * (k // 2), dilation=d), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.spatial = nn.Sequential(*cbr(channels, mid, 1, 1), *cbr(mid, mid, 3, dilation), *cbr(mid, mid, 3, dilation),
                                     nn.Conv2d(mid, 1, 1))

    @torch.no_grad()
    def init_pretrained_start(self) -> float:
        """Zero both branches' last layers: ``M_c = M_s = 0``, so the module scales by ``1 + sigmoid(0) = 1.5``
        for every input, where the sigmoid is steepest; both last layers get gradient at once."""
        for layer in (self.channel[-1], self.spatial[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return 1.5

    def forward(self, x: Tensor) -> Tensor:
        c = self.channel(x.mean((2, 3)))[:, :, None, None]  # [B, C, 1, 1]
        s = self.spatial(x)  # [B, 1, H, W]
        return x * (1.0 + torch.sigmoid(c + s))


def bam(*, reduction: int = 16, dilation: int = 4) -> AttentionParts:
    """BAM in every block, after the last BN (SPEC §6)."""
    return AttentionParts(block=partial(BAM, reduction=reduction, dilation=dilation))
