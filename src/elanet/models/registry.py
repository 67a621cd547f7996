"""Model names and builders: ``create_model('resnet56_ela', num_classes=100)``.

A name is a backbone plus a variant suffix. Each variant is one line of ``_VARIANTS``: its label,
the builder of its parts (``attention/``), the families it is defined for, its per-family option
defaults, and whether it uses the deep stem on ImageNet.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..attention.bam import bam
from ..attention.channel import cbam, eca, gc, se
from ..attention.context import AttentionParts
from ..attention.dia import dia
from ..attention.dla import dla_l
from ..attention.layer import ela, mrla_b, mrla_l
from ..attention.rla import rla
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["create_model", "list_models", "model_info", "list_variants"]

_BACKBONES: dict[str, dict[str, Any]] = {
    "resnet20": dict(layers=(2, 2, 2), planes=(16, 32, 64), strides=(1, 2, 2), block=Bottleneck, family="cifar"),
    "resnet56": dict(layers=(6, 6, 6), planes=(16, 32, 64), strides=(1, 2, 2), block=Bottleneck, family="cifar"),
    "resnet110": dict(layers=(12, 12, 12), planes=(16, 32, 64), strides=(1, 2, 2), block=Bottleneck, family="cifar"),
    "resnet18": dict(layers=(2, 2, 2, 2), planes=(64, 128, 256, 512), strides=(1, 2, 2, 2), block=BasicBlock, family="imagenet"),
    "resnet34": dict(layers=(3, 4, 6, 3), planes=(64, 128, 256, 512), strides=(1, 2, 2, 2), block=BasicBlock, family="imagenet"),
    "resnet50": dict(layers=(3, 4, 6, 3), planes=(64, 128, 256, 512), strides=(1, 2, 2, 2), block=Bottleneck, family="imagenet"),
    "resnet101": dict(layers=(3, 4, 23, 3), planes=(64, 128, 256, 512), strides=(1, 2, 2, 2), block=Bottleneck, family="imagenet"),
}
_FAMILY = {"cifar": dict(num_classes=10, input_size=(3, 32, 32)), "imagenet": dict(num_classes=1000, input_size=(3, 224, 224))}


@dataclass(frozen=True)
class Variant:
    """One attention variant: label, parts builder, the backbones it has a model for, option defaults."""

    label: str
    build: Callable[..., AttentionParts] | None
    backbones: tuple[str, ...]
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # family -> option defaults
    deep_stem: bool = False  # on bottleneck ImageNet ResNets (the MRLA-B authors' stem)

    def options(self) -> list[str]:
        """The attention options its builder takes (``drop_path`` is a model-wide setting)."""
        if self.build is None:
            return []
        return [p for p in inspect.signature(self.build).parameters if p != "drop_path"]


_CIFAR = ("resnet20", "resnet56", "resnet110")
_IMAGENET = ("resnet50", "resnet101")
_SMALL = ("resnet18", "resnet34")
_ALL = _CIFAR + _SMALL + _IMAGENET

_VARIANTS: dict[str, Variant] = {
    "": Variant("plain", None, _ALL),
    "_mrla_l": Variant("MRLA-L", mrla_l, _ALL),
    "_mrla_b": Variant("MRLA-B", mrla_b, _ALL, {"imagenet": dict(head_dim=16)}, deep_stem=True),
    "_ela": Variant("ELA", ela, _ALL, {"imagenet": dict(head_dim=16)}, deep_stem=True),
    "_se": Variant("SE", se, _ALL, {"imagenet": dict(rd_divisor=8, bias=True)}),
    "_eca": Variant("ECA", eca, _ALL),
    "_cbam": Variant("CBAM", cbam, _CIFAR + _IMAGENET),
    "_bam": Variant("BAM", bam, _CIFAR),
    "_dia": Variant("DIA", dia, _CIFAR),
    "_dla_l": Variant("DLA-L", dla_l, _CIFAR + _IMAGENET, {"imagenet": dict(reduction=16)}),
    "_gc": Variant("GC", gc, _IMAGENET),
    "_rla": Variant("RLA", rla, _IMAGENET),
}


def list_models() -> list[str]:
    """Every registered model name, backbones in order of size, each plain then with attention."""
    return [b + v for b in _BACKBONES for v, spec in _VARIANTS.items() if b in spec.backbones]


def list_variants() -> dict[str, str]:
    """Variant suffix (``''`` for plain) -> label, e.g. ``{'_dia': 'DIA', ...}``."""
    return {v: spec.label for v, spec in _VARIANTS.items()}


def _split(name: str) -> tuple[str, str]:
    for v in sorted(_VARIANTS, key=len, reverse=True):
        backbone = name[: len(name) - len(v)] if v else name
        if name.endswith(v) and backbone in _BACKBONES:
            spec = _VARIANTS[v]
            if backbone not in spec.backbones:
                raise ValueError(f"{spec.label} has no model on {backbone}: it is defined for {', '.join(spec.backbones)}")
            return backbone, v
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (`elanet models` lists all)")


def model_info(name: str) -> dict[str, Any]:
    """Backbone, variant (``'plain'``, ``'ela'``, ``'dia'``, ...) and its label (``'ELA'``, ``'DIA'``), family
    (``'cifar'`` / ``'imagenet'``), default classes and input size."""
    backbone, v = _split(name)
    family = _BACKBONES[backbone]["family"]
    return dict(backbone=backbone, variant=v[1:] or "plain", label=_VARIANTS[v].label, family=family, **_FAMILY[family])


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int = 3,
    drop_path: float = 0.0,
    norm_layer: type[nn.Module] = nn.BatchNorm2d,
    **attn_options: Any,
) -> ResNet:
    """Build a registered model.

    Args:
        name: backbone + variant, e.g. ``'resnet56'``, ``'resnet56_ela'``, ``'resnet110_dia'``,
            ``'resnet50_rla'`` (``elanet models`` lists them).
        num_classes: classifier outputs (default 10 for CIFAR models, 1000 for ImageNet models).
        in_chans: input channels.
        drop_path: DropPath rate on the attention branch of the variants that have one (MRLA-L,
            MRLA-B, ELA, DLA-L; the paper uses 0.2); other models ignore it.
        norm_layer: normalisation class of the backbone.
        **attn_options: options of the variant's attention, e.g. ``head_dim`` (MRLA / ELA / DLA-L;
            default 32, and 16 for ImageNet MRLA-B / ELA, SPEC §2) or ``reduction`` (SE, CBAM, BAM,
            DIA, DLA-L, GC). An option the variant does not take raises ``ValueError``.

    ImageNet bottleneck MRLA-B / ELA use the deep stem of the MRLA-B authors (timm's ``resnet50c``
    layout); every other ImageNet model uses the 7x7 stem of torchvision.
    """
    backbone, v = _split(name)
    spec = _VARIANTS[v]
    cfg = dict(_BACKBONES[backbone])
    family = cfg.pop("family")
    unknown = sorted(set(attn_options) - set(spec.options()))
    if unknown:
        takes = ", ".join(spec.options()) or "none"
        raise ValueError(f"{name} does not take {', '.join(unknown)}: its attention options are: {takes}")
    head_dim = attn_options.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        raise ValueError(f"head_dim must be a positive whole number of channels per head, got {head_dim!r}; "
                         "leave it out for the paper's default")  # (reliability, issue 12)
    attn = None
    if spec.build is not None:
        options = {**spec.defaults.get(family, {}), **{k: x for k, x in attn_options.items() if x is not None}}
        if "drop_path" in inspect.signature(spec.build).parameters:
            options["drop_path"] = drop_path
        attn = spec.build(**options)
    if family == "cifar":
        stem = "cifar"
    else:
        stem = "deep" if spec.deep_stem and cfg["block"] is Bottleneck else "standard"
    num_classes = _FAMILY[family]["num_classes"] if num_classes is None else num_classes
    model = ResNet(**cfg, stem=stem, num_classes=num_classes, in_chans=in_chans, attn=attn, norm_layer=norm_layer)
    model.name = name  # type: ignore[assignment]
    return model
