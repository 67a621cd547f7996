"""Study figures: top-1 against training time per setting, and how often each block was pruned."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .figure import new_figure, save_figure

__all__ = ["plot_accuracy_time", "plot_pruning_frequency", "draw_study"]


def _label(setting: dict[str, str]) -> str:
    return ", ".join(setting.values()) or "all"


def plot_accuracy_time(settings: Sequence[dict[str, Any]], *, title: str = ""):
    """Mean best top-1 (± std over seeds) against mean training seconds per run (± std), one point per setting."""
    done = [s for s in settings if "best" in s]
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(done))]
    for s, c in zip(done, colors):
        (y, ys), (x, xs) = s["best"], s["train_s"]
        ax.errorbar([x], [y], xerr=[0 if math.isnan(xs) else xs], yerr=[0 if math.isnan(ys) else ys], fmt="o", color=c,
                    capsize=3, label=f"{_label(s['setting'])} (n={s['runs']})")
    ax.set_xlabel("training time per run (s, sum of epoch times)")
    ax.set_ylabel("best test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "accuracy against training time", fontsize=9)
    return fig


def plot_pruning_frequency(settings: Sequence[dict[str, Any]], *, title: str = ""):
    """Heatmap: rows are settings, columns blocks (ELA mask index), colour the fraction of seeds that pruned it."""
    rows = [s for s in settings if "frequency" in s]
    if not rows:
        raise ValueError("no finished ELA runs in the study: nothing was pruned, so there is no frequency to draw")
    n = max(len(s["frequency"]) for s in rows)
    grid = np.full((len(rows), n), np.nan)
    for i, s in enumerate(rows):
        grid[i, : len(s["frequency"])] = s["frequency"]
    fig = new_figure(min(3.0 + 0.22 * n, 16.0), 1.4 + 0.35 * len(rows))
    ax = fig.add_subplot()
    im = ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"{_label(s['setting'])}  J={s['jaccard']:.2f}" if math.isfinite(s["jaccard"])
                                     else _label(s["setting"]) for s in rows], fontsize=7)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=6)
    ax.set_xlabel("block (ELA mask index)")
    fig.colorbar(im, ax=ax, label="fraction of seeds that pruned it")
    ax.set_title(title or "how often each block was pruned (J: mean pairwise Jaccard across seeds)", fontsize=9)
    return fig


def draw_study(settings: Sequence[dict[str, Any]], out_dir: str | os.PathLike, *, title: str = "", fmt: str = "png") -> list[Path]:
    """Write ``study_accuracy.<fmt>`` and, when the study has ELA runs, ``study_pruning.<fmt>`` into ``out_dir``."""
    paths = [save_figure(plot_accuracy_time(settings, title=title), out_dir, "study_accuracy", fmt)]
    if any("frequency" in s for s in settings):
        paths.append(save_figure(plot_pruning_frequency(settings, title=f"{title}: pruned-block frequency" if title else ""),
                                 out_dir, "study_pruning", fmt))
    return paths
