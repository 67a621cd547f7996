"""Bottleneck ResNets for CIFAR and ImageNet with optional layer attention after every block (SPEC §1-2)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import LayerMemory, MRLABase

__all__ = ["Bottleneck", "Stage", "ResNet"]

AttnLayer = Callable[[int], nn.Module]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck, expansion 4, then an optional layer-attention module.

    The attention module sees the block output after the residual add and ReLU, the block's
    (projected) identity and the stage's key/value memory.
    """

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        *,
        stride: int = 1,
        attn_layer: AttnLayer | None = None,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), norm_layer(out_chs))
        self.attn = attn_layer(out_chs) if attn_layer is not None else None

    def forward(self, x: Tensor, memory: LayerMemory | None = None) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)) + identity)
        if self.attn is not None:
            out = self.attn(out, identity, memory)
        return out


class Stage(nn.Sequential):
    """A run of blocks sharing one layer-attention memory; the key/value set restarts here.

    Called with a single tensor like any ``nn.Sequential``, so stages plug into torchvision's
    ``IntermediateLayerGetter`` / ``BackboneWithFPN`` unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        active = sum(isinstance(getattr(b, "attn", None), MRLABase) and b.attn.active for b in self)
        memory = LayerMemory(capacity=active)  # its value buffer is allocated once, for the active blocks
        for block in self:
            x = block(x, memory)
        return x


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
    """Bottleneck ResNet with optional layer attention (timm-style surface).

    Args:
        layers: blocks per stage, e.g. ``(6, 6, 6)`` for CIFAR ResNet-56, ``(3, 4, 6, 3)`` for ResNet-50.
        planes: bottleneck width per stage (outputs are ``4 * planes``).
        strides: stride of the first block of each stage.
        stem: ``'cifar'`` (3x3, 16 channels), ``'standard'`` (7x7 + max-pool) or ``'deep'`` (three 3x3 + max-pool).
        num_classes: classifier outputs (0 for no classifier).
        in_chans: input channels.
        attn_layer: called with a block's output channels to build its attention module, or None.
        norm_layer: normalisation class.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        planes: Sequence[int],
        strides: Sequence[int],
        stem: str = "cifar",
        num_classes: int = 10,
        in_chans: int = 3,
        attn_layer: AttnLayer | None = None,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if not (len(layers) == len(planes) == len(strides)) or min(layers) < 1:
            raise ValueError("layers, planes and strides need one positive entry per stage")
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"num_classes must be >= 0 and in_chans >= 1, got {num_classes} and {in_chans}")
        self.conv1, self.bn1, maxpool, chs, reduction = _stem(stem, in_chans, norm_layer)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        self.feature_info: list[dict] = []
        self.stage_names: list[str] = []
        for i, (n, p, s) in enumerate(zip(layers, planes, strides)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(chs, p, stride=s if j == 0 else 1, attn_layer=attn_layer, norm_layer=norm_layer))
                chs = p * Bottleneck.expansion
            reduction *= s
            name = f"layer{i + 1}"
            self.add_module(name, Stage(*blocks))
            self.stage_names.append(name)
            self.feature_info.append({"num_chs": chs, "reduction": reduction, "module": name})
        self.num_features = chs
        self.num_classes = num_classes
        self.fc = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()
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
        x = self.forward_stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
