"""Study files: a grid of training settings crossed with seeds, resolved to one train config per cell.

A study file is YAML::

    name: table6-distributions
    description: EBQM step 4 with other CDFs / activations (paper Table 6)
    seeds: [0, 1, 2, 3, 4]
    axes:                                   # the grid: every combination of axis values, times the seeds
      mapping: [normal, gamma, beta, softmax, sigmoid]   # a train setting and its values
      method:                               # or a name with named groups of settings
        threshold: {strategy: threshold, threshold: 0.02}
        fixed: {strategy: fixed, fixed_count: {match: ebqm}}   # EBQM's per-round counts, same seed
        ebqm: {strategy: quantile}
    settings: {drop_path: 0.2}              # applied to every cell
    datasets:                               # per-dataset settings and axes, picked by --dataset (default digits)
      digits: {settings: {epochs: 8}, axes: {model: [resnet20_ela]}}
      cifar100: {axes: {model: [resnet56_ela, resnet110_ela]}}

Each cell's config is resolved exactly as ``elanet train`` resolves its own (preset <- ``--config``
<- study settings <- train flags <- the cell's axis values) and validated by the trainer's own
:meth:`TrainConfig.validate`, so a bad value is refused before any run starts.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..training.config import TrainConfig, resolve_config

__all__ = ["Cell", "Study", "load_study", "RUNTIME_KEYS"]

TOP_KEYS = ("name", "description", "seeds", "axes", "settings", "datasets")
PROFILE_KEYS = ("settings", "axes")
SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# settings that change how a run executes, not what it computes: they may differ when a study is resumed
RUNTIME_KEYS = ("out", "device", "workers", "threads", "plots", "tensorboard", "data_dir", "download")
NOT_AXES = ("out", "seed")


@dataclass
class Cell:
    """One run of a study: its name, axis values (labels), seed and resolved config.

    ``match`` names the cell whose per-round pruned counts become this cell's ``fixed_count``
    (the paper's fixed-count strategy, matched to EBQM from the same seed); None for ordinary cells.
    """

    name: str
    labels: dict[str, str]
    seed: int
    config: TrainConfig
    match: str | None = None

    @property
    def setting(self) -> tuple[str, ...]:
        """The cell's axis values without the seed: the row of ``study.md`` it belongs to."""
        return tuple(self.labels.values())


@dataclass
class Study:
    """A resolved study: its cells in run order (seed-major, so partial results cover every setting)."""

    name: str
    description: str
    source: str
    dataset: str
    axes: list[str]
    seeds: list[int]
    cells: list[Cell] = field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """What makes two studies the same: cell names and the settings that change results."""
        return {
            "name": self.name,
            "cells": {c.name: {**{k: v for k, v in c.config.to_dict().items() if k not in RUNTIME_KEYS},
                               "match": c.match} for c in self.cells},
        }


def _fail(path: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def _label(value: Any) -> str:
    """A value as it appears in a cell name and a table: lists joined, no path-hostile characters."""
    if isinstance(value, (list, tuple)):
        text = ",".join(_label(v) for v in value) or "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._,-]", "-", text)


def _mapping(path: str, where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"'{where}' must be a mapping (key: value), got {type(value).__name__}")
    return value


def _check_settings(path: str, where: str, settings: dict[str, Any]) -> None:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise _fail(path, f"unknown setting {unknown[0]!r} in '{where}': use a train setting ({', '.join(SETTINGS)})")
    if "out" in settings or "seed" in settings:
        raise _fail(path, f"'{where}' may not set 'out' or 'seed': the study names run folders and takes seeds from 'seeds'")


def _axis_values(path: str, name: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    """An axis as (label, settings) pairs; a named axis maps labels to groups of settings."""
    if isinstance(values, dict):  # named groups of settings
        if not values:
            raise _fail(path, f"axis {name!r} has no values: give at least one")
        out = []
        for label, group in values.items():
            group = _mapping(path, f"axes.{name}.{label}", group)
            _check_settings(path, f"axes.{name}.{label}", group)
            out.append((_label(label), group))
        return out
    if name not in SETTINGS or name in NOT_AXES:
        allowed = ", ".join(s for s in SETTINGS if s not in NOT_AXES)
        raise _fail(path, f"unknown axis {name!r}: an axis is a train setting ({allowed}) with a list of values, "
                          "or any name with a mapping of named settings (seeds go under 'seeds')")
    if not isinstance(values, list):
        raise _fail(path, f"axis {name!r} must be a list of values, got {type(values).__name__}")
    if not values:
        raise _fail(path, f"axis {name!r} has no values (empty grid): list at least one")
    return [(_label(v), {name: v}) for v in values]


def _seeds(path: str, seeds: Any) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(path, f"'seeds' must be a list of integers or a count, got {seeds!r}")
    if not seeds:
        raise _fail(path, "'seeds' is empty (empty grid): list at least one seed, e.g. seeds: [0, 1, 2, 3, 4]")
    if len(set(seeds)) != len(seeds):
        raise _fail(path, f"'seeds' repeats a seed: {seeds}")
    return seeds


def load_study(
    path: str | Path,
    *,
    flags: dict[str, Any] | None = None,
    preset: str | None = None,
    config_file: str | None = None,
) -> Study:
    """Read a study file and resolve every cell's config; raises ``ValueError`` naming the key at fault.

    Args:
        path: the study YAML.
        flags: train settings given on the command line; they apply to every cell and may not
            name an axis of the study.
        preset: ``--preset`` (default: the dataset's).
        config_file: ``--config`` YAML applied under the study's settings.
    """
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"study file {path} does not exist: pass a YAML file such as studies/seeds.yaml")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise _fail(path, "is not valid YAML" + (f" at line {mark.line + 1}" if mark else "")) from None
    raw = _mapping(path, "the study file", raw)
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}: a study file has {', '.join(TOP_KEYS)}")
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    dataset = flags.get("dataset", "digits")
    datasets = _mapping(path, "datasets", raw.get("datasets"))
    if datasets and dataset not in datasets:
        raise _fail(path, f"no settings for dataset {dataset!r}: use --dataset {' or '.join(datasets)}, "
                          f"or add 'datasets: {dataset}:' to the file")
    profile = _mapping(path, f"datasets.{dataset}", datasets.get(dataset))
    bad = sorted(set(profile) - set(PROFILE_KEYS))
    if bad:
        raise _fail(path, f"unknown key {bad[0]!r} in 'datasets.{dataset}': use settings and axes")
    settings = {**_mapping(path, "settings", raw.get("settings")),
                **_mapping(path, f"datasets.{dataset}.settings", profile.get("settings"))}
    _check_settings(path, "settings", settings)
    # the dataset's axes first (e.g. the model: tables group by depth), then the file's own
    own, per_dataset = _mapping(path, "axes", raw.get("axes")), _mapping(path, f"datasets.{dataset}.axes", profile.get("axes"))
    axes_raw = {**per_dataset, **{k: v for k, v in own.items() if k not in per_dataset}}
    axes = {name: _axis_values(path, str(name), values) for name, values in axes_raw.items()}
    seeds = _seeds(path, raw.get("seeds", [0]))
    clash = sorted(k for k in flags if k in axes or any(k in g for vals in axes.values() for _, g in vals))
    if clash:
        raise _fail(path, f"--{clash[0].replace('_', '-')} is set by an axis of this study: drop the flag")
    name = str(raw.get("name") or Path(path).stem)
    study = Study(name=name, description=str(raw.get("description") or ""), source=path, dataset=dataset,
                  axes=list(axes), seeds=seeds)

    combos = list(itertools.product(*axes.values()))
    names = set()
    for seed in seeds:
        for combo in combos:
            labels = {axis: label for axis, (label, _) in zip(axes, combo)}
            values: dict[str, Any] = {}
            for _, group in combo:
                values.update(group)
            cell_name = ",".join(f"{a}={v}" for a, v in labels.items()) + ("," if labels else "") + f"seed={seed}"
            if cell_name in names:
                raise _fail(path, f"two cells are both named {cell_name!r}: an axis repeats a value")
            names.add(cell_name)
            match = None
            if isinstance(values.get("fixed_count"), dict):
                match = _match(path, values, labels, axes, seed)
                values["fixed_count"] = 1  # placeholder for validation; the matched run's counts replace it
            overrides = {**settings, **flags, **values, "seed": seed}
            try:
                cfg = resolve_config(preset=preset, config_file=config_file, overrides=overrides)
            except (ValueError, TypeError) as e:
                raise _fail(path, f"cell {cell_name}: {e}") from None
            study.cells.append(Cell(cell_name, labels, seed, cfg, match))
    return study


def _match(path: str, values: dict[str, Any], labels: dict[str, str], axes: dict[str, list], seed: int) -> str:
    """The cell whose per-round pruned counts a ``fixed_count: {match: LABEL}`` cell uses."""
    spec = values["fixed_count"]
    target = spec.get("match") if set(spec) == {"match"} else None
    owners = [a for a, vals in axes.items() if any(lab == labels[a] and "fixed_count" in g for lab, g in vals)]
    axis = owners[0] if owners else None
    allowed = [lab for lab, _ in axes[axis]] if axis else []
    if target is None or axis is None or _label(target) not in allowed or _label(target) == labels[axis]:
        raise _fail(path, f"fixed_count must be an integer or {{match: LABEL}} naming another value of its axis "
                          f"({', '.join(allowed) or 'none'}), got {spec!r}")
    other = {**labels, axis: _label(target)}
    return ",".join(f"{a}={v}" for a, v in other.items()) + f",seed={seed}"
