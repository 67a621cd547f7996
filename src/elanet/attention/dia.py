"""DIA, dense-and-implicit attention (Huang et al., DIANet, AAAI 2020), as in the DLA repository's
``dia_resnet.py`` (SPEC §6): one LSTM cell per stage, shared by all its blocks."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .context import AttentionParts, StageContext

__all__ = ["DIACell", "DIAGate", "dia"]


def _mlp(i: int, o: int, reduction: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, i // reduction), nn.ReLU(inplace=True), nn.Linear(i // reduction, o))


class DIACell(StageContext):
    """The stage's shared DIA-LSTM cell (DIANet eq. 4-6), and its state for one forward pass.

    Gates ``[i, f, g, o] = W_ih(y) + W_hh(h)``, each ``W`` a bottleneck MLP ``C -> C/r -> 4C``;
    ``c' = sigmoid(f) c + sigmoid(i) tanh(g)`` and ``h' = sigmoid(o) sigmoid(c')`` (DIANet replaces
    tanh by sigmoid on the output, so that h' is a gate in (0, 1)). The state starts at zero at the
    stage's first block.
    """

    def __init__(self, channels: int, *, reduction: int = 4) -> None:
        super().__init__()
        if channels < reduction:
            raise ValueError(f"DIA needs channels ({channels}) >= reduction ({reduction}): lower the reduction")
        self.w_ih = _mlp(channels, 4 * channels, reduction)
        self.w_hh = _mlp(channels, 4 * channels, reduction)

    @torch.no_grad()
    def init_pretrained_start(self) -> None:
        """Zero the last layer of both MLPs: all gate pre-activations are 0, so ``c`` stays 0 and every
        block's ``h' = sigmoid(0) sigmoid(0) = 0.25`` (see :meth:`DIAGate.init_pretrained_start`)."""
        for mlp in (self.w_ih, self.w_hh):
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def begin(self, blocks: list[nn.Module], x: Tensor, carry: None) -> dict:
        return {"cell": self, "h": None, "c": None}

    def step(self, y: Tensor, state: dict) -> Tensor:
        """One LSTM step on the descriptor ``y`` [B, C]; updates ``state`` and returns h'."""
        h, c = state["h"], state["c"]
        if h is None:
            h = c = y.new_zeros(y.shape)
        i, f, g, o = (self.w_ih(y) + self.w_hh(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.sigmoid(c)
        state["h"], state["c"] = h, c
        return h


class DIAGate(nn.Module):
    """A block's DIA: ``x * h'`` with h' the shared cell's step on ``GAP(x)``, x the branch before the add.

    Its parameters live in the stage's :class:`DIACell`.
    """

    position = "branch"
    takes_state = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def init_pretrained_start(self) -> float:
        """The gate once the stage's cell starts from pretrained weights (:meth:`DIACell.init_pretrained_start`):
        0.25 for every input; the cell's last layers get gradient at once."""
        return 0.25

    def forward(self, x: Tensor, state: dict) -> Tensor:
        h = state["cell"].step(x.mean((2, 3)), state)
        return x * h[:, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def dia(*, reduction: int = 4) -> AttentionParts:
    """DIA: the gate in every block, one cell per stage (CIFAR ResNets)."""
    return AttentionParts(block=DIAGate, stage=partial(DIACell, reduction=reduction))
