"""Model names and builders: ``create_model('resnet56_ela', num_classes=100)``."""
from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Callable

from torch import nn

from ..attention import MRLABase, MRLALight
from .resnet import ResNet

__all__ = ["create_model", "list_models", "model_info"]

# depth -> (blocks per stage, planes, strides, stem, default classes, dataset family)
_BACKBONES: dict[str, dict[str, Any]] = {
    "resnet20": dict(layers=(2, 2, 2), planes=(16, 32, 64), strides=(1, 2, 2), family="cifar"),
    "resnet56": dict(layers=(6, 6, 6), planes=(16, 32, 64), strides=(1, 2, 2), family="cifar"),
    "resnet110": dict(layers=(12, 12, 12), planes=(16, 32, 64), strides=(1, 2, 2), family="cifar"),
    "resnet50": dict(layers=(3, 4, 6, 3), planes=(64, 128, 256, 512), strides=(1, 2, 2, 2), family="imagenet"),
    "resnet101": dict(layers=(3, 4, 23, 3), planes=(64, 128, 256, 512), strides=(1, 2, 2, 2), family="imagenet"),
}
_VARIANTS = ("", "_mrla_l", "_mrla_b", "_ela")
_FAMILY = {"cifar": dict(num_classes=10, input_size=(3, 32, 32)), "imagenet": dict(num_classes=1000, input_size=(3, 224, 224))}


def list_models() -> list[str]:
    """Every registered model name, backbones in order of size, each plain then with attention."""
    return [b + v for b in _BACKBONES for v in _VARIANTS]


def _split(name: str) -> tuple[str, str]:
    if name not in list_models():
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (`elanet models` lists all)")
    for v in _VARIANTS[1:]:
        if name.endswith(v):
            return name[: -len(v)], v[1:]
    return name, ""


def model_info(name: str) -> dict[str, Any]:
    """Family (``'cifar'`` / ``'imagenet'``), variant, default classes and input size of a model name."""
    backbone, variant = _split(name)
    family = _BACKBONES[backbone]["family"]
    return dict(backbone=backbone, variant=variant or "plain", family=family, **_FAMILY[family])


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int = 3,
    drop_path: float = 0.0,
    head_dim: int | None = None,
    norm_layer: type[nn.Module] = nn.BatchNorm2d,
) -> ResNet:
    """Build a registered model.

    Args:
        name: e.g. ``'resnet56'``, ``'resnet56_mrla_l'``, ``'resnet56_mrla_b'``, ``'resnet56_ela'``.
        num_classes: classifier outputs (default 10 for CIFAR models, 1000 for ImageNet models).
        in_chans: input channels.
        drop_path: DropPath rate on the attention branch (the paper uses 0.2).
        head_dim: channels per attention head; default 32 on CIFAR, and on ImageNet 32 for MRLA-L
            and 16 for MRLA-B / ELA (SPEC §2).
        norm_layer: normalisation class.

    ImageNet MRLA-B / ELA use the deep stem of the MRLA-B authors; every other ImageNet model uses
    the 7x7 stem.
    """
    backbone, variant = _split(name)
    cfg = dict(_BACKBONES[backbone])
    family = cfg.pop("family")
    if family == "cifar":
        stem, d = "cifar", 32
    else:
        stem, d = ("deep", 16) if variant in ("mrla_b", "ela") else ("standard", 32)
    if head_dim is not None:  # validation of the head width (reliability, issue 12)
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive whole number of channels per head, got {head_dim!r}; "
                             "leave it out for the paper's default")
        d = head_dim
    attn: Callable[[int], nn.Module] | None = None
    if variant == "mrla_l":
        attn = partial(MRLALight, head_dim=d, drop_path=drop_path)
    elif variant in ("mrla_b", "ela"):
        attn = partial(MRLABase, head_dim=d, drop_path=drop_path, prunable=variant == "ela")
    num_classes = _FAMILY[family]["num_classes"] if num_classes is None else num_classes
    model = ResNet(**cfg, stem=stem, num_classes=num_classes, in_chans=in_chans, attn_layer=attn, norm_layer=norm_layer)
    model.name = name  # type: ignore[assignment]
    return model
