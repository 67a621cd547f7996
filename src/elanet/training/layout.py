"""Memory layout of a training or benchmark run: the measured default per device, and the override.

On this project's CPU measurements (``benchmarks/RESULTS.md``, "Memory layout"), channels-last makes
a ResNet-110 training step faster for plain, MRLA-L, MRLA-B and ELA alike, now that the attention
path keeps it end to end. On CUDA channels-last is what cuDNN's tensor-core kernels prefer under
autocast; ``benchmarks/gpu.sh`` measures both layouts there.
"""
from __future__ import annotations

import torch

__all__ = ["MEMORY_FORMATS", "default_memory_format", "resolve_memory_format", "run_memory_format", "format_name"]

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def default_memory_format(device: str | torch.device) -> torch.memory_format:
    """The faster layout for training on ``device``: channels-last on CPU and CUDA, else contiguous."""
    return torch.channels_last if torch.device(device).type in ("cpu", "cuda") else torch.contiguous_format


def resolve_memory_format(name: str, device: str | torch.device) -> torch.memory_format:
    """``'auto'`` (the device's default), ``'channels_last'`` or ``'contiguous'`` as a ``torch.memory_format``."""
    if name == "auto":
        return default_memory_format(device)
    if name not in _FORMATS:
        raise ValueError(f"unknown memory format {name!r}: use one of {', '.join(MEMORY_FORMATS)}")
    return _FORMATS[name]


def run_memory_format(cfg: object, device: str | torch.device) -> torch.memory_format:
    """The layout of a training run: its config's ``memory_format``, or channels-last where an older
    config set the deprecated ``channels_last: true``."""
    if getattr(cfg, "channels_last", False):
        return torch.channels_last
    return resolve_memory_format(getattr(cfg, "memory_format", "auto"), device)


def format_name(fmt: torch.memory_format) -> str:
    """``'channels_last'`` or ``'contiguous'``: the name :func:`resolve_memory_format` takes."""
    return "channels_last" if fmt == torch.channels_last else "contiguous"
