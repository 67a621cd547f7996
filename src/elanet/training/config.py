"""Training configuration: presets reproducing the paper's recipes (SPEC §3.3, §4), YAML files and flags."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..data import DATASETS
from ..models import list_models, model_info
from ..pruning import MAPPINGS, check_ebqm_args
from .layout import MEMORY_FORMATS

__all__ = ["RunConfig", "TrainConfig", "check_value", "config_from_dict", "load_run_config", "PRESETS", "DEFAULT_PRESET", "resolve_config", "load_yaml", "save_yaml"]


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _describe(typ: str) -> str:
    base = typ.removesuffix(" | None")
    words = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a text value",
             "list[int]": "a list of whole numbers like [100, 150]",
             "int | list[int]": "a whole number, or a list of them like [2, 1, 0]",
             "list[list[int]]": "a list of [start, end] epoch pairs like [[1, 3], [45, 48]]"}[base]
    return words + (" (or null)" if typ.endswith("| None") else "")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_value(name: str, value: Any, typ: str) -> Any:
    """``value`` checked against the field type ``typ`` (as written in the dataclass); numbers given
    where a float is meant (``5``, ``"1e-4"``, which YAML reads as text) come back as floats."""
    if value is None and typ.endswith("| None"):
        return None
    base = typ.removesuffix(" | None")
    ok = False
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = _is_int(value)
    elif base == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value, ok = float(value), True
    elif base == "str":
        ok = isinstance(value, str)
    elif base == "int | list[int]":
        ok = _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
    elif base == "list[int]":
        ok = isinstance(value, list) and all(_is_int(v) for v in value)
    elif base == "list[list[int]]":
        ok = isinstance(value, list) and all(isinstance(w, list) and len(w) == 2 and all(_is_int(v) for v in w) for w in value)
    else:  # pragma: no cover - a new field type needs a rule here
        raise TypeError(f"no type rule for field {name}: {typ}")
    if not ok:
        raise ValueError(f"{name} must be {_describe(typ)}, got {value!r}")
    return value


@dataclass
class RunConfig:
    """Settings the training core reads (:mod:`elanet.training.core`); a task's config adds its own.

    Every field is checked against its type by :meth:`validate` before anything is written.
    """

    model: str = "resnet20_ela"
    out: str | None = None
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    milestones: list[int] = field(default_factory=lambda: [20, 26])
    lr_decay: float = 0.1
    schedule: str = "step"  # step: x lr_decay after each milestone | cosine: half a cosine from lr to 0 over the run
    # ELA pruning (SPEC §3): windows are 1-based inclusive epoch ranges; empty disables pruning
    windows: list[list[int]] = field(default_factory=lambda: [[1, 2], [10, 11]])
    gamma: float = 0.5
    alpha: float = 5.0
    beta: float = 1.0
    tau: float = 0.3
    strategy: str = "quantile"
    mapping: str = "beta"
    threshold: float = 0.0
    fixed_count: int | list[int] = 1  # per round, or one count per window
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16
    memory_format: str = "auto"  # auto (the device's faster layout, training/layout.py) | channels_last | contiguous
    channels_last: bool = False  # deprecated: the same as memory_format="channels_last" (configs of older runs)
    compile: bool = False  # torch.compile the training forward/backward (recompiles after each pruning round)
    threads: int | None = None
    plots: bool = True
    tensorboard: bool = True

    def check_types(self) -> None:
        """Raise ``ValueError`` for a value of the wrong type (``epochs: 3.5``, ``plots: "no"``)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f.name, getattr(self, f.name), str(f.type)))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the fix for any setting of the wrong type or out of range."""
        self.check_types()
        positive = dict(epochs=self.epochs, lr=self.lr)
        for k, v in positive.items():
            if not v > 0:
                raise ValueError(f"{k} must be > 0, got {v}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("weight_decay and warmup_epochs must be >= 0")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be step or cosine, got {self.schedule!r}")
        if any(m < 1 for m in self.milestones) or sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"milestones {self.milestones} must be increasing epochs >= 1 (lr decays after each)")
        check_ebqm_args(gamma=self.gamma, alpha=self.alpha, beta=self.beta, tau=self.tau)
        if self.mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {self.mapping!r}: use one of {', '.join(MAPPINGS)}")
        if self.strategy not in ("quantile", "threshold", "fixed"):
            raise ValueError(f"unknown strategy {self.strategy!r}: use quantile, threshold or fixed")
        counts = [self.fixed_count] if _is_int(self.fixed_count) else self.fixed_count
        if any(k < 0 for k in counts) or (isinstance(self.fixed_count, list) and len(counts) != len(self.windows)):
            raise ValueError(f"fixed_count must be an integer >= 0, or a list of them with one per window, got {self.fixed_count!r}")
        last = 0
        for w in self.windows:
            if not (1 <= w[0] <= w[1]) or w[0] <= last:
                raise ValueError(f"windows {self.windows} must be increasing [start, end] epoch pairs (1-based, inclusive)")
            last = w[1]
        if last > self.epochs and self.model.endswith("_ela"):
            raise ValueError(f"pruning window ending at epoch {last} is beyond the last epoch ({self.epochs}): shorten the window or raise --epochs")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}")
        if self.channels_last and self.memory_format == "contiguous":
            raise ValueError("channels_last=True contradicts memory_format='contiguous': drop channels_last (deprecated)")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("--amp fp16 needs a CUDA GPU (on the CPU it runs ~10x slower): use --amp bf16 or none")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_at(self, epoch: int, frac: float = 0.0, *, iteration: int = 0) -> float:
        """Learning rate during 1-based ``epoch`` with ``frac`` of it done (``iteration``: optimiser steps
        before this one): linear warm-up over ``warmup_epochs``, then x ``lr_decay`` per milestone passed
        (``schedule: step``) or ``lr * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of the epochs after
        the warm-up that is done (``schedule: cosine``). A task's config adds to this (detection warms up
        over iterations)."""
        if epoch <= self.warmup_epochs:
            return self.lr * (epoch - 1 + frac) / self.warmup_epochs if self.warmup_epochs else self.lr
        if self.schedule == "cosine":
            t = (epoch - 1 + frac - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        return self.lr * self.lr_decay ** sum(epoch > m for m in self.milestones)


@dataclass
class TrainConfig(RunConfig):
    """Every setting of a classification run; the resolved config is saved as ``config.yaml`` in the run folder."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None  # folder / imagenet crop size (default 224)
    batch_size: int = 64
    eval_batch_size: int | None = None
    drop_path: float = 0.0
    label_smoothing: float = 0.0
    workers: int = 4
    pretrained: str | None = None  # backbone weights: a file, 'torchvision:resnet50' or 'timm:resnet50c' (local cache)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the fix for any setting of the wrong type or out of range."""
        super().validate()
        if self.model not in list_models():
            model_info(self.model)  # raises with close matches
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}: use one of {', '.join(DATASETS)}")
        if not self.batch_size > 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not 0 <= self.drop_path < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("drop_path and label_smoothing must be in [0, 1)")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")


_CIFAR_SCHEDULE = dict(windows=[[1, 3], [45, 48], [91, 93]], alpha=5.0, beta=1.0, tau=0.3)
_IMAGENET_SCHEDULE = dict(windows=[[1, 3], [51, 53]], alpha=2.0, beta=5.0, tau=0.25)

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: an ELA ResNet-20 on scikit-learn's 8x8 digits, about a minute on 2 cores. The
    # 2-epoch warm-up matters: at lr 0.1 from the first step the deeper models diverge on these tiny images.
    "digits": dict(model="resnet20_ela", epochs=30, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                   warmup_epochs=2, milestones=[20, 26], drop_path=0.0, windows=[[1, 2], [10, 11]], alpha=5.0,
                   beta=1.0, tau=0.3),
    # SPEC §4 CIFAR recipe: SGD 0.1, batch 128, 180 epochs, x0.1 at 100 and 150, DropPath 0.2.
    "cifar": dict(model="resnet56_ela", epochs=180, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                  warmup_epochs=0, milestones=[100, 150], drop_path=0.2, **_CIFAR_SCHEDULE),
    # SPEC §4 ImageNet recipe: SGD 0.1, batch 256, 100 epochs, 3 warm-up epochs, x0.1 every 30 epochs.
    "imagenet": dict(model="resnet50_ela", epochs=100, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
                     warmup_epochs=3, milestones=[30, 60, 90], drop_path=0.2, **_IMAGENET_SCHEDULE),
}
DEFAULT_PRESET = {"digits": "digits", "cifar10": "cifar", "cifar100": "cifar", "imagenet": "imagenet", "folder": "imagenet"}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of settings; a malformed file or unknown key raises ``ValueError``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{p} is not valid YAML{where}: fix the syntax (settings are 'key: value' lines)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a mapping of settings (key: value), not {type(data).__name__}")
    return data


def save_yaml(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as ``key: value`` lines, atomically."""
    from .run_dir import write_text

    write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


C = TypeVar("C", bound=RunConfig)


def config_from_dict(cls: type[C], values: dict[str, Any], *, source: str = "the settings") -> C:
    """Build and validate a ``cls`` from ``values``: unknown keys and values of the wrong type raise
    ``ValueError`` naming the key, before anything is written."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - set(fields)))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} in {source}: valid keys are {', '.join(sorted(fields))}")
    checked = {k: check_value(k, v, fields[k]) for k, v in values.items()}
    cfg = cls(**checked)
    cfg.validate()
    return cfg


def load_run_config(cls: type[C], run: str | os.PathLike, overrides: dict[str, Any] | None = None) -> C:
    """The saved ``config.yaml`` of a run folder with ``overrides`` applied, validated."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run} is not a run folder (no config.yaml): pass a folder written by `elanet train`")
    return config_from_dict(cls, {**load_yaml(path), **(overrides or {})}, source=str(path))


def resolve_config(*, preset: str | None = None, config_file: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset, then YAML file, then command-line overrides (later wins); validated.

    The preset defaults to the dataset's recipe (digits / cifar / imagenet) when not given.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    from_file = load_yaml(config_file) if config_file else {}
    preset = overrides.pop("preset", None) or preset or from_file.pop("preset", None)
    from_file.pop("preset", None)
    dataset = overrides.get("dataset", from_file.get("dataset", TrainConfig.dataset))
    name = preset or (DEFAULT_PRESET.get(dataset, "digits") if isinstance(dataset, str) else "digits")
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    source = f"{config_file} / the flags" if config_file else "the flags"
    return config_from_dict(TrainConfig, {**PRESETS[name], **from_file, **overrides}, source=source)
