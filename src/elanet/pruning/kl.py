"""Redundancy between adjacent layer-attention blocks: KL divergence with epsilon padding (paper eq. 8-11)."""
from __future__ import annotations

import math

from torch import Tensor

__all__ = ["adjacent_kl"]


def adjacent_kl(p: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """D(P || P') between the attention of a block and of the next active block (paper eq. 11).

    ``p`` covers the first ``m`` layers of ``q``'s support; it is padded with ``eps`` on the layers
    it lacks: ``sum_{i<m} p_i log(p_i / q_i) + sum_{j>=m} eps log(eps / q_j)``. Probabilities are
    clamped to ``>= eps`` before the log and the result is computed in float32 (SPEC §3.1).

    Args:
        p: ``[..., m]`` distribution of the earlier block.
        q: ``[..., n]`` distribution of the later block, ``n > m``, same leading shape.
        eps: padding and clamping value.

    Returns:
        ``[...]``: the divergence per leading index (e.g. per sample and head).
    """
    if p.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"leading shapes differ: p {tuple(p.shape)} vs q {tuple(q.shape)}")
    m, n = p.shape[-1], q.shape[-1]
    if m >= n:
        raise ValueError(f"p must cover fewer layers than q (the later block adds itself), got {m} and {n}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    p = p.float().clamp_min(eps)
    logq = q.float().clamp_min(eps).log()
    head = (p * (p.log() - logq[..., :m])).sum(-1)
    tail = (eps * (math.log(eps) - logq[..., m:])).sum(-1)
    return head + tail
