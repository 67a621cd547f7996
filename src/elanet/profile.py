"""Parameters and multiply-accumulates of a model, counted by ``torch.utils.flop_counter``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Profile", "profile", "count_params"]


@dataclass(frozen=True)
class Profile:
    """Model size and cost for one input of ``input_size``; ``macs`` counts multiply-accumulates
    (half the FLOPs ``torch.utils.flop_counter`` reports), as the paper's "FLOPs" column does."""

    params: int
    macs: int
    input_size: tuple[int, ...]

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them: pruning removes work, not parameters)."""
    return sum(p.numel() for p in model.parameters())


def profile(model: nn.Module, input_size: Sequence[int]) -> Profile:
    """Count parameters and MACs of one forward pass in eval mode on a single image.

    Convolutions, linear layers and the matrix products of the attention (scores and the
    aggregation over earlier layers, paper eq. 5) are counted; element-wise ops are not.

    Args:
        input_size: ``(C, H, W)`` of one image.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (channels, height, width), got {input_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros((1, *size), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return Profile(params=count_params(model), macs=counter.get_total_flops() // 2, input_size=size)
