"""Branch attention from timm: SE, ECA, CBAM and GC, placed after the block's last BN (SPEC §6).

These modules keep no state between blocks; each builder returns the variant's parts. Each is
timm's module plus :meth:`init_pretrained_start`, the start it takes in a network loaded from
pretrained weights (the protocol: ``elanet.models.pretrained.init_attention``).
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import EcaModule, GlobalContext, SEModule
from timm.layers.cbam import CbamModule
from torch import nn

from .context import AttentionParts

__all__ = ["SE", "ECA", "CBAM", "GC", "se", "eca", "cbam", "gc"]


def _zero(*layers: nn.Module) -> None:
    for layer in layers:
        nn.init.zeros_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)


class SE(SEModule):
    """timm's :class:`~timm.layers.SEModule` with a pretrained start."""

    @torch.no_grad()
    def init_pretrained_start(self) -> float:
        """Zero the excitation's last layer: the gate is ``sigmoid(0) = 0.5`` for every input, where the
        sigmoid is steepest, and that layer's gradient (``W1 GAP(x)`` times the upstream gradient) is non-zero."""
        _zero(self.fc2)
        return 0.5


class ECA(EcaModule):
    """timm's :class:`~timm.layers.EcaModule` with a pretrained start."""

    @torch.no_grad()
    def init_pretrained_start(self) -> float:
        """Zero the 1-D conv (and its bias): the gate is 0.5 for every input; the conv's gradient is non-zero."""
        _zero(self.conv2 if self.conv2 is not None else self.conv)
        return 0.5


class CBAM(CbamModule):
    """timm's CBAM with a pretrained start."""

    @torch.no_grad()
    def init_pretrained_start(self) -> float:
        """Channel gate 0.5 (the MLP's last layer zeroed) times spatial gate 0.5 (the 7x7 conv's BN at
        gamma = beta = 0, so the map is 0 in train and eval mode): 0.25. The zeroed layer and the BN's
        gamma get gradient at once, the layers before them from the first step on."""
        _zero(self.channel.fc2, self.spatial.conv.bn)
        return 0.25


class GC(GlobalContext):
    """timm's :class:`~timm.layers.GlobalContext` (``fuse_add``) with a pretrained start."""

    @torch.no_grad()
    def init_pretrained_start(self) -> float:
        """Zero the transform's last 1x1 conv: the block adds exactly 0, and that conv's gradient is non-zero."""
        _zero(self.mlp_add.fc2)
        return 1.0


def se(*, reduction: int = 16, rd_divisor: int = 1, bias: bool = False) -> AttentionParts:
    """Squeeze-and-excitation (Hu et al., 2018, eq. 2-3): ``x * sigmoid(W2 relu(W1 GAP(x)))``.

    CIFAR follows the DLA repository's ``senet.py`` (no biases, ``C / 16`` hidden units); ImageNet
    follows timm's ``seresnet50`` (biases, hidden units rounded to a multiple of 8).
    """
    return AttentionParts(block=partial(SE, rd_ratio=1.0 / reduction, rd_divisor=rd_divisor, bias=bias))


def eca() -> AttentionParts:
    """Efficient channel attention (Wang et al., 2020, eq. 12): a 1-D conv over the pooled channels,
    kernel ``k = |(log2 C + 1) / 2|_odd``."""
    return AttentionParts(block=ECA)


def cbam(*, reduction: int = 16) -> AttentionParts:
    """CBAM (Woo et al., 2018, eq. 1-3): channel MLP on average and max pools, then a 7x7 spatial gate."""
    return AttentionParts(block=partial(CBAM, rd_ratio=1.0 / reduction))


def gc(*, reduction: int = 16) -> AttentionParts:
    """Global context block (Cao et al., 2019, eq. 3) in GCNet's form: softmax context pooling, a
    LayerNorm bottleneck transform (ratio ``1 / reduction``) and fusion by addition."""
    return AttentionParts(block=partial(GC, fuse_add=True, fuse_scale=False, rd_ratio=1.0 / reduction))
