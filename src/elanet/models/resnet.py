"""ResNets for CIFAR and ImageNet (bottleneck and basic blocks) with an optional attention variant in every block (SPEC §1-2, §6)."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import MRLABase
from ..attention.context import AttentionParts, Relay, attachment

__all__ = ["BasicBlock", "Bottleneck", "Stage", "ResNet"]


class _Block(nn.Module):
    """The part every residual block shares: its attention module and where it attaches.

    ``attn`` (see ``attention/context.py``) either maps the residual branch before the add
    (``position = 'branch'``) or the block output after the add and ReLU (``'output'``), and may
    read the stage's per-forward ``state``. A block without attention runs like torchvision's.
    """

    expansion = 1

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "attn":  # (re)attaching, e.g. removing a pruned block's module for export, re-reads where it goes
            a = attachment(value)
            self._branch = a is not None and a.position == "branch"
            self._output = a is not None and a.position == "output"
            self._stateful = a is not None and a.takes_state
            self._pre = a is not None and a.input_chs > 0
            self._inplace_add = a is None or not a.keeps_branch

    def _attach(self, attn: nn.Module | None) -> int:
        self.attn = attn
        return getattr(attn, "input_chs", 0) if attn is not None else 0

    def _finish(self, out: Tensor, identity: Tensor, state: Any) -> Tensor:
        if self._branch:
            out = self.attn(out, state) if self._stateful else self.attn(out)
        if self._inplace_add:
            out += identity
        else:
            out = out + identity
        out = F.relu(out, inplace=True)
        if self._output:
            out = self.attn(out, identity, state)
        return out


class BasicBlock(_Block):
    """3x3 (stride) -> 3x3 basic block of ResNet-18/34 (torchvision layout), then optional attention."""

    expansion = 1

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        attn_layer: Callable[[int], nn.Module] | None = None,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        extra = self._attach(attn_layer(planes) if attn_layer is not None else None)
        self.conv1 = nn.Conv2d(in_chs + extra, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = None
        if stride != 1 or in_chs != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, planes, 1, stride=stride, bias=False), norm_layer(planes))

    def forward(self, x: Tensor, state: Any = None) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.attn.pre(x, state) if self._pre else x)
        out = F.relu(self.bn1(out), inplace=True)
        out = self.bn2(self.conv2(out))
        return self._finish(out, identity, state)


class Bottleneck(_Block):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck, expansion 4, then optional attention (SPEC §1-2, §6)."""

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        attn_layer: Callable[[int], nn.Module] | None = None,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        extra = self._attach(attn_layer(out_chs) if attn_layer is not None else None)
        self.conv1 = nn.Conv2d(in_chs + extra, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), norm_layer(out_chs))

    def forward(self, x: Tensor, state: Any = None) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.attn.pre(x, state) if self._pre else x)
        out = F.relu(self.bn1(out), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return self._finish(out, identity, state)


class Stage(nn.Module):
    """A run of blocks (children ``'0'``, ``'1'``, ... as in ``nn.Sequential``) and its attention context.

    The context (``attention/context.py``) owns what the stage's blocks share and makes their state
    for each forward pass. A stage is callable with a single tensor like any ``nn.Sequential``, so
    it plugs into torchvision's ``IntermediateLayerGetter`` / ``BackboneWithFPN``; the model calls
    :meth:`run`, which threads the cross-stage carry explicitly.
    """

    def __init__(self, blocks: Sequence[nn.Module], *, context: nn.Module | None = None) -> None:
        super().__init__()
        for i, b in enumerate(blocks):
            self.add_module(str(i), b)
        self.num_blocks = len(blocks)
        self.context = context
        self.index = 0
        self.relay: Relay | None = None  # set by the model when the context's state crosses stages

    def __len__(self) -> int:
        return self.num_blocks

    def __iter__(self) -> Iterator[nn.Module]:
        return (self._modules[str(i)] for i in range(self.num_blocks))

    def __getitem__(self, i: int | slice) -> nn.Module | list[nn.Module]:
        return list(self)[i]

    def run(self, x: Tensor, carry: Any = None) -> tuple[Tensor, Any]:
        """Run the blocks with one fresh state; returns the output and the carry for the next stage."""
        ctx = self.context
        if ctx is None:
            for i in range(self.num_blocks):
                x = self._modules[str(i)](x)
            return x, None
        blocks = list(self)
        state = ctx.begin(blocks, x, carry)
        for block in blocks:
            x = block(x, state)
        return x, ctx.end(state)

    def forward(self, x: Tensor) -> Tensor:
        if self.context is None or not self.context.crosses_stages:
            return self.run(x)[0]
        if self.relay is None:
            raise ValueError("this stage continues a recurrent state across stages: build it inside a ResNet")
        out, carry = self.run(x, self.relay.take(self.index, x))
        self.relay.put(self.index, out, carry)
        return out


def _stem(kind: str, in_chans: int, norm_layer: type[nn.Module]) -> tuple[nn.Module, nn.Module, nn.Module, int, int]:
    """``conv1``, ``bn1``, ``maxpool``, output channels and stride of a stem, named as torchvision / timm name them.

    ``'deep'`` is timm's deep stem (``resnet50c``): ``conv1`` is conv-BN-ReLU-conv-BN-ReLU-conv and
    ``bn1`` normalises its output, so torchvision and timm weights load by name.
    """
    if kind == "cifar":
        return nn.Conv2d(in_chans, 16, 3, padding=1, bias=False), norm_layer(16), nn.Identity(), 16, 1
    if kind == "standard":
        return nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False), norm_layer(64), nn.MaxPool2d(3, 2, 1), 64, 4
    if kind == "deep":
        conv1 = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, stride=2, padding=1, bias=False), norm_layer(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), norm_layer(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
        )
        return conv1, norm_layer(64), nn.MaxPool2d(3, 2, 1), 64, 4
    raise ValueError(f"unknown stem {kind!r}: use 'cifar', 'standard' or 'deep'")


class ResNet(nn.Module):
    """ResNet with optional attention (timm-style surface; torchvision / timm parameter names).

    Args:
        layers: blocks per stage, e.g. ``(6, 6, 6)`` for CIFAR ResNet-56, ``(3, 4, 6, 3)`` for ResNet-50.
        planes: block width per stage (outputs are ``block.expansion * planes``).
        strides: stride of the first block of each stage.
        block: :class:`Bottleneck` or :class:`BasicBlock`.
        stem: ``'cifar'`` (3x3, 16 channels), ``'standard'`` (7x7 + max-pool) or ``'deep'`` (three 3x3 + max-pool).
        num_classes: classifier outputs (0 for no classifier).
        in_chans: input channels.
        attn: the attention variant's parts (block module, stage context, final module), or None.
        norm_layer: normalisation class.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        planes: Sequence[int],
        strides: Sequence[int],
        block: type[_Block] = Bottleneck,
        stem: str = "cifar",
        num_classes: int = 10,
        in_chans: int = 3,
        attn: AttentionParts | None = None,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if not (len(layers) == len(planes) == len(strides)) or min(layers) < 1:
            raise ValueError("layers, planes and strides need one positive entry per stage")
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"num_classes must be >= 0 and in_chans >= 1, got {num_classes} and {in_chans}")
        attn = attn or AttentionParts()
        self.conv1, self.bn1, maxpool, chs, reduction = _stem(stem, in_chans, norm_layer)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        self.feature_info: list[dict] = []
        self.stage_names: list[str] = []
        relay = Relay(len(layers))
        for i, (n, p, s) in enumerate(zip(layers, planes, strides)):
            blocks = []
            for j in range(n):
                blocks.append(block(chs, p, stride=s if j == 0 else 1, attn_layer=attn.block, norm_layer=norm_layer))
                chs = p * block.expansion
            reduction *= s
            name = f"layer{i + 1}"
            stage = Stage(blocks, context=attn.stage(chs) if attn.stage is not None else None)
            stage.index, stage.relay = i, relay
            self.add_module(name, stage)
            self.stage_names.append(name)
            self.feature_info.append({"num_chs": chs, "reduction": reduction, "module": name})
        self.final = attn.final(chs) if attn.final is not None else None
        self.num_features = chs + (self.final.extra_chs if self.final is not None else 0)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        self._index_attention()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _index_attention(self) -> None:
        index = 0
        for s, name in enumerate(self.stage_names):
            first = True
            for m in getattr(self, name).modules():
                if isinstance(m, MRLABase):
                    m.block_index, m.stage_index, m.first_in_stage = index, s, first
                    index, first = index + 1, False

    @property
    def stages(self) -> list[Stage]:
        return [getattr(self, n) for n in self.stage_names]

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one (0 removes it)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stem(self, x: Tensor) -> Tensor:
        """``conv1`` -> ``bn1`` -> ReLU -> ``maxpool`` (an identity on CIFAR)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Feature maps after every stage (strides in ``feature_info``), e.g. for an FPN."""
        x, carry = self.forward_stem(x), None
        feats = []
        for stage in self.stages:
            x, carry = stage.run(x, carry)
            feats.append(x)
        return feats

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map (with the variant's final carry fused in, e.g. RLA's state)."""
        x, carry = self.forward_stem(x), None
        for stage in self.stages:
            x, carry = stage.run(x, carry)
        return x if self.final is None else self.final(x, carry)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
