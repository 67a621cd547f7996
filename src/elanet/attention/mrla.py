"""MRLA-B (with ELA pruning) and MRLA-L layer-attention modules (paper eq. 4-7, 16; SPEC §2-3)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .aggregate import LayerMemory
from .depthwise import value_and_descriptor
from .epilogue import branch_add, fused_epilogue_ok, gated_branch_add
from .record import AttentionRecord

__all__ = ["eca_kernel_size", "DropPath", "MRLABase", "MRLALight", "PRETRAINED_GAMMA"]

PRETRAINED_GAMMA = 1e-2  # SPEC §7: MRLA-B / ELA attention BN gamma after pretrained loading: small, so ReLU still passes gradient


def eca_kernel_size(channels: int) -> int:
    """Kernel of the 1-D query/key convolutions: t = int(|(log2 C + 1) / 2|), made odd (ECA-Net)."""
    t = int(abs((math.log2(channels) + 1) / 2))
    return t if t % 2 else t + 1


class DropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch (Huang et al., 2016)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * self._keep(x)

    def add(self, x: Tensor, branch: Tensor) -> Tensor:
        """``x + self(branch)`` as one fused multiply-add (no intermediate full-size tensor)."""
        keep = self.sample_scale(branch)
        return x + branch if keep is None else torch.addcmul(x, branch, keep)

    def sample_scale(self, x: Tensor) -> Tensor | None:
        """A fresh per-sample scale ``[B, 1, ...]`` (0 or 1/(1-p)), or None when nothing is dropped (p = 0 or eval)."""
        if self.p == 0.0 or not self.training:
            return None
        return self._keep(x)

    def _keep(self, x: Tensor) -> Tensor:
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return keep.div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _QKV(nn.Module):
    """Shared query/key/value extractors: ECA-style 1-D convs on the pooled descriptor, depthwise 3x3 value."""

    position = "output"  # attaches after the block's add + ReLU and sees its identity (attention/context.py)
    takes_state = True

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim}): choose a head_dim that divides every stage's width")
        self.channels = channels
        self.head_dim = head_dim
        self.heads = channels // head_dim
        self.kernel_size = k = eca_kernel_size(channels)
        self.conv_q = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.conv_k = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.conv_v = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.scale = head_dim ** -0.5

    def query_key(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Query and key ``[B, heads, d]``: ``conv_q`` and ``conv_k`` over the descriptor ``y = GAP(x)`` ``[B, C]``.

        Both 1-D convolutions are computed as one small product of the sequence's sliding windows
        with the two kernels: the same numbers, without two convolution calls per block whose
        fixed cost on CPU exceeds the arithmetic of a ``[B, 1, C]`` input.
        """
        b, k = y.shape[0], self.kernel_size
        windows = F.pad(y, (k // 2, k // 2)).unfold(1, k, 1)  # [B, C, k]: windows[:, c, j] = y_pad[:, c + j]
        kernels = torch.cat((self.conv_q.weight.view(1, k), self.conv_k.weight.view(1, k))).to(y.dtype)
        q, key = torch.matmul(windows, kernels.t()).unbind(-1)  # cross-correlation, as nn.Conv1d computes it
        return q.view(b, self.heads, self.head_dim), key.view(b, self.heads, self.head_dim)


class MRLABase(_QKV):
    """MRLA-B layer attention (paper eq. 5), prunable as in ELA (eq. 16).

    Block t of a stage attends, per head, over the keys of the active blocks 1..t of its stage and
    returns ``x + DropPath(ReLU(BN(sum_s alpha_{t,s} v_s)))``. When ``active`` is False the block
    does no attention work, returns ``x`` unchanged and adds nothing to the stage's memory.

    Args:
        channels: channels C of the block output.
        head_dim: channels per head d (32 on CIFAR, 16 on ImageNet).
        drop_path: DropPath rate on the attention branch.
        prunable: whether ELA may switch this block off (False for MRLA-B models).
    """

    def __init__(self, channels: int, *, head_dim: int = 32, drop_path: float = 0.0, prunable: bool = False) -> None:
        super().__init__(channels, head_dim)
        self.bn = nn.BatchNorm2d(channels)
        self.drop_path = DropPath(drop_path)
        self.prunable = prunable
        self._active = True
        self.block_index = -1  # position among the model's MRLA-B blocks, set by the model
        self.stage_index = -1
        self.first_in_stage = False
        self.recorder: AttentionRecord | None = None

    def forward(self, x: Tensor, identity: Tensor | None, memory: LayerMemory) -> Tensor:
        if not self.active:
            return x
        v, y, x = value_and_descriptor(x, self.conv_v)  # x: the same values, its gradients summed natively
        q, k = self.query_key(y)
        memory.keys.append(k)
        keys = torch.stack(memory.keys, dim=2)  # [B, heads, n, d]
        logits = torch.matmul(q.unsqueeze(2), keys.transpose(-1, -2)).squeeze(2) * self.scale
        attn = logits.softmax(dim=-1)  # [B, heads, n]: a distribution over the active layers
        if self.recorder is not None:
            self.recorder.add(self.block_index, self.stage_index, attn)
        return memory.retrieve_add(attn, v, x, self.bn, self.drop_path)  # stores v_t; x + DropPath(ReLU(BN(sum_s alpha_s v_s)))

    @torch.no_grad()
    def init_pretrained_start(self, gamma: float = PRETRAINED_GAMMA) -> float:
        """Start near the pretrained network (SPEC §7): BN gamma = ``gamma`` (small), beta = 0.

        The branch adds ``ReLU(BN(o))``; at gamma = 0 the ReLU would pass no gradient and the branch
        would never learn, so the start is close to, not equal to, the pretrained function.
        """
        self.bn.weight.fill_(gamma)
        self.bn.bias.zero_()
        return 1.0

    @property
    def active(self) -> bool:
        """Whether the block retrieves (m_l = 1); switching it off also stops its parameters' gradients."""
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        on = bool(on)
        if on != self._active:
            for p in self.parameters():
                p.requires_grad_(on)
        self._active = on

    def get_extra_state(self) -> dict[str, Any]:
        return {"active": self.active}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.active = bool(state.get("active", True))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, k={self.kernel_size}, prunable={self.prunable}, active={self.active}"


class _GateMix(torch.autograd.Function):
    """``gate * v + lambda * identity`` of MRLA-L (paper eq. 7) with a lean backward.

    Autograd's ``addcmul`` backward, given a full-size factor and a small one that both need
    gradients, first scales the full-size factor by the scalar ``value`` (a whole extra pass). Here
    each gradient is one product: ``grad * gate``, ``grad * lambda``, and the two reductions
    ``sum(grad * v)`` over H, W and ``sum(grad * identity)`` over B, H, W share one scratch tensor.
    """

    @staticmethod
    def forward(ctx, v: Tensor, gate: Tensor, identity: Tensor, lam: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v, gate, identity, lam)
        return torch.mul(v, gate).addcmul_(identity, lam)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, gate, identity, lam = ctx.saved_tensors
        need_v, need_gate, need_id, need_lam = ctx.needs_input_grad
        grad_v = grad * gate if need_v else None
        grad_id = grad * lam if need_id else None
        grad_gate = grad_lam = None
        if need_gate or need_lam:
            scratch = torch.empty_like(grad)
            if need_gate:
                grad_gate = torch.mul(grad, v, out=scratch).sum((2, 3), keepdim=True)
            if need_lam:
                grad_lam = torch.mul(grad, identity, out=scratch).sum((0, 2, 3), keepdim=True)
        return grad_v, grad_gate, grad_id, grad_lam


class MRLALight(_QKV):
    """MRLA-L, the light layer attention (paper eq. 7; SPEC §2).

    Only the current layer is retrieved: a per-head gate ``sigmoid(q·k / sqrt(d))`` scales the value,
    a learnable per-channel ``lambda`` (standard-normal init) carries the block's identity input,
    and the block returns ``x + DropPath(BN(gate * v + lambda * identity))``.
    """

    def __init__(self, channels: int, *, head_dim: int = 32, drop_path: float = 0.0) -> None:
        super().__init__(channels, head_dim)
        self.bn = nn.BatchNorm2d(channels)
        self.drop_path = DropPath(drop_path)
        self.lambda_t = nn.Parameter(torch.randn(channels))

    @torch.no_grad()
    def init_pretrained_start(self) -> float:
        """Start exactly at the pretrained network: BN gamma = beta = 0, so the branch adds 0 and
        gamma's gradient (the normalised branch times the upstream gradient) is non-zero."""
        self.bn.weight.zero_()
        self.bn.bias.zero_()
        return 1.0

    def forward(self, x: Tensor, identity: Tensor, memory: LayerMemory | None = None) -> Tensor:
        b, c = x.shape[:2]
        v, y, x = value_and_descriptor(x, self.conv_v)  # x: the same values, its gradients summed natively
        q, k = self.query_key(y)
        gate = torch.sigmoid((q * k).sum(-1) * self.scale)  # [B, heads]
        gate = gate.repeat_interleave(self.head_dim, dim=1).view(b, c, 1, 1)
        lam = self.lambda_t.view(1, c, 1, 1)
        if fused_epilogue_ok(x, self.bn, v, identity):  # CPU training: mix, BN and add in the native kernels
            return gated_branch_add(x, v, gate, identity, lam, self.bn, self.drop_path)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # eager training: the lean backward
            a = _GateMix.apply(v, gate, identity, lam)
        else:  # inference, export and torch.compile trace plain ops (the compiler makes its own backward)
            a = torch.addcmul(v * gate, lam, identity)
        return branch_add(x, a, self.bn, self.drop_path, relu=False)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, k={self.kernel_size}"
