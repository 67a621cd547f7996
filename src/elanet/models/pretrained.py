"""Start a model from pretrained ImageNet weights: torchvision / timm models, files, or the local cache (SPEC §7).

elanet's ResNets name their parameters as torchvision and timm do (7x7 stem ``conv1`` / ``bn1``; the
deep stem is timm's ``conv1`` Sequential + ``bn1``), so a backbone's weights load by name. What a
pretrained ResNet lacks is the attention: those parameters, and the classifier when the class
count differs, are the only keys allowed to be missing. Anything else that does not fit (a deeper
ResNet, the 7x7 stem into a deep-stem model, ...) is refused with the first keys that differ.

The attention then starts so that the network computes what the pretrained one computes (exactly,
or for MRLA-B / ELA almost), while its branch can still learn (SPEC §7; :func:`init_attention`).
RLA's extra inputs (the block's first conv, the classifier) take the pretrained weights in their
leading input channels and start at zero in the extra ones.
"""
from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attention.mrla import PRETRAINED_GAMMA

__all__ = ["load_pretrained", "PretrainedReport", "upgrade_state_dict", "resolve_source", "init_attention",
           "load_state_dict_checked", "MRLA_B_GAMMA"]

MRLA_B_GAMMA = PRETRAINED_GAMMA  # SPEC §7: small, so the start is close to the pretrained net and ReLU still passes gradient
_ATTENTION = re.compile(r"(^|\.)(attn|context)\.|^final\.")  # a block's attention, a stage context, the final module
_SHOWN = 3  # mismatched keys named in an error


@dataclass(frozen=True)
class PretrainedReport:
    """What :func:`load_pretrained` did.

    Attributes:
        loaded: parameter / buffer keys copied from the source.
        missing: model keys the source does not have (attention, maybe the classifier), left as built.
        classifier_reset: whether the source's classifier was skipped (class counts differ).
        initialised: attention modules given a pretrained-friendly start, by class name.
        widened: model keys with more input channels than the source's (RLA): the pretrained weights
            fill the leading channels, the extra ones start at zero.
    """

    loaded: int
    missing: list[str]
    classifier_reset: bool
    initialised: dict[str, int]
    widened: list[str] = field(default_factory=list)

    def summary(self) -> str:
        init = ", ".join(f"{n} x{k}" for n, k in self.initialised.items()) or "none"
        return (f"loaded {self.loaded} pretrained tensors; {len(self.missing)} attention/classifier tensors start fresh"
                f"{' (classifier reset: class counts differ)' if self.classifier_reset else ''}; attention initialised: {init}"
                f"{f'; {len(self.widened)} weights widened (extra inputs start at 0)' if self.widened else ''}")


def resolve_source(source: Any) -> dict[str, Tensor]:
    """A state dict from a model, a state dict, a file, or ``'torchvision:NAME'`` / ``'timm:NAME[.TAG]'`` in the cache.

    Cached names are only read from the local caches (torch hub's ``checkpoints/`` folder, the
    Hugging Face hub cache); nothing is downloaded.

    Raises:
        FileNotFoundError: a file or cached weight that is not there (the message says where it looked).
        ValueError: a source of the wrong kind or an unreadable file.
    """
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return _unwrap(dict(source), "the given mapping")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"pretrained source must be a model, a state_dict, a file or 'torchvision:NAME' / 'timm:NAME', "
                         f"got {type(source).__name__}")
    text = str(source)
    if text.startswith("torchvision:"):
        return _read(_torchvision_cached(text.split(":", 1)[1]))
    if text.startswith("timm:"):
        return _read(_timm_cached(text.split(":", 1)[1]))
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found: pass a file, or 'torchvision:resnet50' / 'timm:resnet50c' "
                                f"when those weights are in the local cache")
    return _read(path)


def _unwrap(sd: dict[str, Any], where: str) -> dict[str, Tensor]:
    """The tensors of a plain state dict, or of the ``model`` / ``state_dict`` entry of a checkpoint."""
    for key in ("model", "state_dict", "model_state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = dict(sd[key])
            break
    if not sd or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{where} holds no state dict (parameter name -> tensor)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}  # DDP-saved weights


def _read(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _unwrap(load_file(str(path)), str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"cannot read pretrained weights from {path} ({type(e).__name__}): pass a state_dict file saved by torch.save") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return _unwrap(dict(obj), str(path))


def _torchvision_cached(name: str) -> Path:
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError):
        raise ValueError(f"torchvision has no model {name!r} with weights (e.g. torchvision:resnet50)") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.is_file():
        raise FileNotFoundError(f"torchvision:{name} is not in the local cache ({path}); nothing is downloaded here: fetch it "
                                f"where there is internet (torchvision.models.{name}(weights='DEFAULT')) and copy it there, or pass a file")
    return path


def _timm_cached(name: str) -> Path:
    try:
        import timm
    except ImportError:
        raise ValueError("timm:NAME needs timm installed (pip install timm), or pass a file") from None
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained weights named {name!r} (e.g. timm:resnet50c, timm:resnet50.a1_in1k)")
    looked = []
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for file in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(cfg.hf_hub_id, file)
                if isinstance(hit, str):
                    return Path(hit)
            looked.append(f"Hugging Face cache {cfg.hf_hub_id}")
        except ImportError:
            pass
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if path.is_file():
            return path
        looked.append(str(path))
    raise FileNotFoundError(f"timm:{name} is not in the local cache (looked in {'; '.join(looked) or 'nothing'}); nothing is "
                            f"downloaded here: fetch it where there is internet (timm.create_model({name!r}, pretrained=True)), "
                            f"or pass a file")


def upgrade_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename the ``stem.*`` keys of checkpoints written before the stem took torchvision / timm names.

    Old stems were one Sequential: ``stem.0`` conv, ``stem.1`` BN (CIFAR and 7x7), and for the deep stem
    ``stem.0/1/3/4/6`` convs and BNs then ``stem.7`` BN. Other keys pass unchanged.
    """
    if not any(k.startswith("stem.") for k in state_dict):
        return dict(state_dict)
    deep = isinstance(getattr(model, "conv1", None), nn.Sequential)
    table = {"7": "bn1", **{i: f"conv1.{i}" for i in ("0", "1", "3", "4", "6")}} if deep else {"0": "conv1", "1": "bn1"}
    out = {}
    for k, v in state_dict.items():
        if k.startswith("stem."):
            index, _, rest = k[len("stem."):].partition(".")
            if index not in table:
                raise ValueError(f"unknown old stem key {k!r}: this checkpoint's stem does not fit {type(model).__name__}'s")
            k = f"{table[index]}.{rest}"
        out[k] = v
    return out


def _fmt(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _hint(missing: list[str], unexpected: list[str]) -> str:
    if "conv1.weight" in unexpected and any(k.startswith("conv1.0.") for k in missing):
        return ": these are 7x7-stem weights but the model has the deep stem (MRLA-B / ELA ImageNet models): use timm:resnet50c / resnet101c"
    if "conv1.0.weight" in unexpected and "conv1.weight" in missing:
        return ": these are deep-stem weights but the model has the 7x7 stem: use torchvision:resnet50 / timm:resnet50"
    if any(re.match(r"layer\d+\.\d+\.", k) for k in unexpected + missing):
        return ": the source has a different number of blocks (e.g. ResNet-101 weights for a ResNet-50): pick the matching depth"
    return ""


def load_pretrained(model: nn.Module, source: Any, *, attention_gamma: float = MRLA_B_GAMMA) -> PretrainedReport:
    """Load backbone weights into ``model`` and give its attention a pretrained-friendly start (SPEC §7).

    Args:
        model: an elanet ResNet (any variant).
        source: a torchvision / timm model, a state dict, a file (``torch.save`` state dict, an elanet
            checkpoint, ``.safetensors``), or ``'torchvision:NAME'`` / ``'timm:NAME[.TAG]'`` read from
            the local cache only.
        attention_gamma: starting gamma of the MRLA-B / ELA attention BN.

    Returns:
        A :class:`PretrainedReport`.

    Raises:
        ValueError: keys or shapes that do not fit, other than missing attention (and a classifier of
            another class count); the message names the first few.
        FileNotFoundError: a file or cached weight that is not there.
    """
    src = upgrade_state_dict(resolve_source(source), model)
    own = model.state_dict()
    classifier_reset = False
    fc_w = next((k for k in ("fc.weight", "head.fc.weight", "classifier.weight") if k in own), None)
    fc = fc_w[: -len("weight")] if fc_w else None  # "fc."
    if fc_w and fc_w in src and src[fc_w].shape[0] != own[fc_w].shape[0]:
        src = {k: v for k, v in src.items() if not k.startswith(fc)}
        classifier_reset = True
    widened = []
    for k, extra in _extra_inputs(model).items():
        if k in src and src[k].dim() >= 2 and src[k].shape[1] + extra == own[k].shape[1] \
                and src[k].shape[:1] + src[k].shape[2:] == own[k].shape[:1] + own[k].shape[2:]:
            wide = own[k].clone()
            wide[:, : src[k].shape[1]] = src[k]  # the extra input channels: zeroed by init_attention
            src[k] = wide
            widened.append(k)
    unexpected = [k for k in src if k not in own]
    missing = [k for k in own if k not in src]
    shapes = [f"{k} {tuple(src[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in src and isinstance(own[k], Tensor) and isinstance(src[k], Tensor) and src[k].shape != own[k].shape]
    not_attention = [k for k in missing if not _ATTENTION.search(k) and not (classifier_reset and k.startswith(fc))]
    if unexpected or not_attention or shapes:
        parts = []
        if shapes:
            parts.append(f"shapes differ: {_fmt(shapes)}")
        if unexpected:
            parts.append(f"not in the model: {_fmt(unexpected)}")
        if not_attention:
            parts.append(f"missing from the weights: {_fmt(not_attention)}")
        name = getattr(model, "name", type(model).__name__)
        raise ValueError(f"pretrained weights do not fit {name}: {'; '.join(parts)}{_hint(not_attention, unexpected)}")
    model.load_state_dict(src, strict=False)
    initialised = init_attention(model, gamma=attention_gamma) if any(_ATTENTION.search(k) for k in missing) else {}
    return PretrainedReport(len(src), missing, classifier_reset, initialised, widened)


def _blocks(model: nn.Module) -> list[nn.Module]:
    from .resnet import BasicBlock, Bottleneck

    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def _branch_norm(block: nn.Module) -> nn.Module:
    """The BN whose output a branch attention module gates (the block's last)."""
    from .resnet import Bottleneck

    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


def _extra_inputs(model: nn.Module) -> dict[str, int]:
    """Weights whose trailing input channels carry attention state (RLA): state-dict key -> extra channels."""
    from ..attention.context import attachment

    names = {m: n for n, m in model.named_modules()}
    out = {f"{names[b]}.conv1.weight": attachment(b.attn).input_chs
           for b in _blocks(model) if b.attn is not None and attachment(b.attn).input_chs > 0}
    final = getattr(model, "final", None)
    if final is not None and getattr(final, "extra_chs", 0) > 0 and isinstance(getattr(model, "fc", None), nn.Linear):
        out["fc.weight"] = final.extra_chs
    return out


@torch.no_grad()
def init_attention(model: nn.Module, *, gamma: float = MRLA_B_GAMMA) -> dict[str, int]:
    """Give every attention module of a freshly loaded pretrained network its pretrained start (SPEC §7).

    Each module owns its start: a module class defines ``init_pretrained_start() -> float | None``,
    which sets its parameters so that, for every input, the module adds exactly 0 to what it sees, or
    scales it by a constant, and returns that constant (1.0 when it adds 0; stage contexts return None).
    A start with a free setting takes it as a keyword: MRLA-B / ELA take ``gamma``.
    This function calls it on every module and then makes the network's function the pretrained one:

    - a **branch gate** that scales by ``s`` (SE, ECA 0.5; CBAM, DIA 0.25; BAM 1.5) has its block's last
      BN scaled by ``1 / s`` (gamma and beta), so the start is exact while the gate sits where the sigmoid
      is steepest (0.5), rather than near 1 where its gradient vanishes. The price: the block's BN
      affine is no longer the pretrained tensor (its product with the gate is), so weight decay on it
      acts on a scaled value;
    - **additive** branches start at exactly 0 with a zeroed last layer (GC) or, for MRLA-L / DLA-L,
      a zero BN gamma, whose gradient is non-zero; RLA's extra input weights of the block's first conv
      and of the classifier are zeroed (their gradients are non-zero once the state is);
    - MRLA-B / ELA add ``ReLU(BN(o))``: a zero BN would pass no gradient, so their BN gamma is the small
      ``gamma`` (beta 0): close to, not equal to, the pretrained network.

    In every case each attention parameter has a non-zero gradient from the second step on. Apply it
    once, right after loading: the BN rescaling is relative.

    Returns:
        The number of modules started, by class name.
    """
    from ..attention.context import attachment

    done: dict[str, int] = {}
    gains: dict[nn.Module, float] = {}
    for m in model.modules():
        start = getattr(m, "init_pretrained_start", None)
        if not callable(start):
            continue
        # a start with a free setting takes it by keyword (MRLA-B / ELA: the small BN gamma)
        gain = start(gamma=gamma) if "gamma" in inspect.signature(start).parameters else start()
        gains[m] = 1.0 if gain is None else float(gain)
        done[type(m).__name__] = done.get(type(m).__name__, 0) + 1
    for block in _blocks(model):
        gain = gains.get(block.attn, 1.0) if block.attn is not None else 1.0
        if gain != 1.0:
            if attachment(block.attn).position != "branch":
                raise ValueError(f"{type(block.attn).__name__}.init_pretrained_start returned a scale ({gain}) but the "
                                 f"module maps the block output: only branch modules can start as a scale")
            norm = _branch_norm(block)
            norm.weight.div_(gain)
            norm.bias.div_(gain)
    for key, extra in _extra_inputs(model).items():
        model.get_parameter(key)[:, -extra:].zero_()
    return done


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, Tensor], *, what: str = "checkpoint") -> None:
    """``model.load_state_dict`` (strict) of an elanet state dict, old ``stem.*`` names upgraded.

    Raises:
        ValueError: one line naming the first keys / shapes that do not fit.
    """
    src, own = upgrade_state_dict(state_dict, model), model.state_dict()
    unexpected = [k for k in src if k not in own]
    missing = [k for k in own if k not in src]
    shapes = [f"{k} {tuple(src[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in src and isinstance(own[k], Tensor) and isinstance(src[k], Tensor) and src[k].shape != own[k].shape]
    if unexpected or missing or shapes:
        parts = ([f"shapes differ: {_fmt(shapes)}"] if shapes else []) + \
                ([f"not in the model: {_fmt(unexpected)}"] if unexpected else []) + \
                ([f"missing from the {what}: {_fmt(missing)}"] if missing else [])
        name = getattr(model, "name", type(model).__name__)
        raise ValueError(f"the {what} does not fit {name}: {'; '.join(parts)}")
    model.load_state_dict(src)
