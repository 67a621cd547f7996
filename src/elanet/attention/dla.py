"""DLA-L, dynamic layer attention, light form (Wang et al., IJCAI 2024), as in the DLA repository's
``dla_l.py`` (CIFAR) and ``resnet_dla_l.py`` (ImageNet); SPEC §6."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .context import AttentionParts, StageContext
from .mrla import MRLALight

__all__ = ["DynamicSharingUnit", "DLALight", "dla_l"]


def _mlp(i: int, o: int, reduction: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, i // reduction), nn.ReLU(inplace=True), nn.Linear(i // reduction, o))


class DynamicSharingUnit(StageContext):
    """The stage's dynamic sharing unit (DSU, DLA eq. 8-10) and its context state for one forward pass.

    ``[i, f, g] = W_ih(y) + W_hh(h)`` with bottleneck MLPs ``C -> C/r -> 3C``;
    ``c' = sigmoid(f) c + sigmoid(i) tanh(g)``, ``h' = sigmoid(c')``. Blocks update the context with
    their output descriptor, then read a gate for their identity from it. The stage also owns the
    depthwise 3x3 conv that excites the identity. The context starts at zero at the stage's first block.
    """

    def __init__(self, channels: int, *, reduction: int = 4) -> None:
        super().__init__()
        if channels < reduction:
            raise ValueError(f"DLA-L needs channels ({channels}) >= reduction ({reduction}): lower the reduction")
        self.w_ih = _mlp(channels, 3 * channels, reduction)
        self.w_hh = _mlp(channels, 3 * channels, reduction)
        self.excite = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)

    def begin(self, blocks: list[nn.Module], x: Tensor, carry: None) -> dict:
        return {"dsu": self, "h": None, "c": None}

    def cell(self, y: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g = (self.w_ih(y) + self.w_hh(h)).chunk(3, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(c), c


class DLALight(MRLALight):
    """A block's DLA-L: MRLA-L (eq. 7) whose identity term is refreshed by the stage's DSU.

    With x the block output and o its identity: ``(h, c) <- DSU(GAP(x), (h, c))`` (the stage's
    context), ``gate = DSU(GAP(o), (h, c))``, ``o' = o * gate + excite(o)``, then MRLA-L on ``(x, o')``.
    """

    def forward(self, x: Tensor, identity: Tensor, state: dict) -> Tensor:  # type: ignore[override]
        dsu: DynamicSharingUnit = state["dsu"]
        y = x.mean((2, 3))
        h, c = state["h"], state["c"]
        if h is None:
            h = c = y.new_zeros(y.shape)
        h, c = dsu.cell(y, h, c)
        state["h"], state["c"] = h, c
        gate, _ = dsu.cell(identity.mean((2, 3)), h, c)
        refreshed = torch.addcmul(dsu.excite(identity), identity, gate[:, :, None, None])
        return super().forward(x, refreshed)


def dla_l(*, head_dim: int = 32, reduction: int = 4, drop_path: float = 0.0) -> AttentionParts:
    """DLA-L: one DSU per stage, one light layer attention per block (reduction 4 on CIFAR, 16 on ImageNet)."""
    return AttentionParts(block=partial(DLALight, head_dim=head_dim, drop_path=drop_path),
                          stage=partial(DynamicSharingUnit, reduction=reduction))
