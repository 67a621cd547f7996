"""Branch attention from timm: SE, ECA, CBAM and GC, placed after the block's last BN (SPEC §6).

These modules keep no state between blocks; each builder returns the variant's parts.
"""
from __future__ import annotations

from functools import partial

from timm.layers import EcaModule, GlobalContext, SEModule
from timm.layers.cbam import CbamModule

from .context import AttentionParts

__all__ = ["se", "eca", "cbam", "gc"]


def se(*, reduction: int = 16, rd_divisor: int = 1, bias: bool = False) -> AttentionParts:
    """Squeeze-and-excitation (Hu et al., 2018, eq. 2-3): ``x * sigmoid(W2 relu(W1 GAP(x)))``.

    CIFAR follows the DLA repository's ``senet.py`` (no biases, ``C / 16`` hidden units); ImageNet
    follows timm's ``seresnet50`` (biases, hidden units rounded to a multiple of 8).
    """
    return AttentionParts(block=partial(SEModule, rd_ratio=1.0 / reduction, rd_divisor=rd_divisor, bias=bias))


def eca() -> AttentionParts:
    """Efficient channel attention (Wang et al., 2020, eq. 12): a 1-D conv over the pooled channels,
    kernel ``k = |(log2 C + 1) / 2|_odd``."""
    return AttentionParts(block=EcaModule)


def cbam(*, reduction: int = 16) -> AttentionParts:
    """CBAM (Woo et al., 2018, eq. 1-3): channel MLP on average and max pools, then a 7x7 spatial gate."""
    return AttentionParts(block=partial(CbamModule, rd_ratio=1.0 / reduction))


def gc(*, reduction: int = 16) -> AttentionParts:
    """Global context block (Cao et al., 2019, eq. 3) in GCNet's form: softmax context pooling, a
    LayerNorm bottleneck transform (ratio ``1 / reduction``) and fusion by addition."""
    return AttentionParts(block=partial(GlobalContext, fuse_add=True, fuse_scale=False, rd_ratio=1.0 / reduction))
