"""Redundancy between adjacent layer-attention blocks: KL divergence with epsilon padding (paper eq. 8-11)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adjacent_kl"]


def adjacent_kl(p: Tensor, q: Tensor, eps: float = 1e-8, *, check: bool = True) -> Tensor:
    """D(P || P') between the attention of a block and of the next active block (paper eq. 11).

    ``p`` covers the first ``m`` layers of ``q``'s support; it is padded with ``eps`` on the layers
    it lacks: ``sum_{i<m} p_i log(p_i / q_i) + sum_{j>=m} eps log(eps / q_j)``. Probabilities are
    clamped to ``>= eps`` before the log and the result is computed in float32 (SPEC §3.1).

    Args:
        p: ``[..., m]`` distribution of the earlier block.
        q: ``[..., n]`` distribution of the later block, ``n > m``, same leading shape.
        eps: padding and clamping value, in (0, 1).
        check: verify that ``p`` and ``q`` are distributions (non-negative, summing to 1 within 1e-3,
            1e-2 in half precision); costs a device sync, so callers that pass softmax outputs may skip it.

    Returns:
        ``[...]``: the divergence per leading index (e.g. per sample and head).
    """
    if p.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"leading shapes differ: p {tuple(p.shape)} vs q {tuple(q.shape)}")
    m, n = p.shape[-1], q.shape[-1]
    if m < 1:
        raise ValueError("p has an empty support (no layers): the earlier block attends to at least itself")
    if m >= n:
        raise ValueError(f"p must cover fewer layers than q (the later block adds itself), got {m} and {n}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1) (a small padding probability, default 1e-8), got {eps}")
    if check and p.numel() and q.numel():
        for name, t in (("p", p), ("q", q)):
            tol = 1e-3 if t.dtype in (torch.float32, torch.float64) else 2e-2  # bf16 / fp16 sums are coarse
            t = t.detach().float()
            low, dev = t.min(), (t.sum(-1) - 1).abs().max()
            if not bool((low >= 0) & (dev <= tol)):
                raise ValueError(f"{name} is not a probability distribution over its last dimension (min {low.item():.3g}, "
                                 f"largest |sum - 1| {dev.item():.3g}): pass softmax outputs")
    p = p.float().clamp_min(eps)
    logq = q.float().clamp_min(eps).log()
    head = (p * (p.log() - logq[..., :m])).sum(-1)
    tail = (eps * (math.log(eps) - logq[..., m:])).sum(-1)
    return head + tail
