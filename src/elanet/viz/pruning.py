"""Pruning charts (the story of paper Figure 1): KL scores, EBQM-mapped values, tau and the mask per round."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .figure import check_format, new_figure, save_figure

__all__ = ["check_rounds", "mask_history", "stage_starts", "pruning_figsize", "plot_pruning", "draw_pruning"]

KEPT, PRUNED, ACTIVE, OFF = "#1f77b4", "#d62728", "#2ca02c", "0.86"
_KEYS = ("round", "epoch", "pairs", "scores", "mapped", "pruned", "mask")


def check_rounds(rounds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return ``rounds`` as a list, or raise ``ValueError`` if it is empty or a round lacks a field
    written by :meth:`elanet.PruningSchedule.decide`."""
    rounds = list(rounds)
    if not rounds:
        raise ValueError("no pruning rounds to draw: the run has not finished a measurement window yet")
    for r in rounds:
        missing = [k for k in _KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"pruning round {r.get('round', '?') if isinstance(r, dict) else r!r} lacks "
                             f"{', '.join(missing)}: pass the rounds written by PruningSchedule.decide (pruning.json)")
        if not len(r["pairs"]) == len(r["scores"]) == len(r["mapped"]):
            raise ValueError(f"pruning round {r['round']} has {len(r['pairs'])} pairs but {len(r['scores'])} scores "
                             f"and {len(r['mapped'])} mapped values")
        n = len(rounds[0]["mask"]) if isinstance(rounds[0]["mask"], list) else -1
        if not isinstance(r["mask"], list) or len(r["mask"]) != n:
            raise ValueError(f"pruning round {r['round']} has a mask of another length than round 1's: "
                             "the file mixes runs; pass the pruning.json of one run")
        blocks = [b for p in r["pairs"] for b in (p if isinstance(p, (list, tuple)) else [None, None])] + list(r["pruned"])
        if any(not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < n for b in blocks) or \
                any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in r["pairs"]):
            raise ValueError(f"pruning round {r['round']} names blocks outside its mask of {n} blocks: "
                             "the file is damaged; pass the pruning.json written by `elanet train`")
    return rounds


def mask_history(rounds: Sequence[dict[str, Any]]) -> list[list[bool]]:
    """The mask before the first round, then after each round (a round's blocks are pruned in it)."""
    first = [bool(on) for on in rounds[0]["mask"]]
    for b in rounds[0]["pruned"]:
        first[b] = True
    return [first] + [[bool(on) for on in r["mask"]] for r in rounds]


def stage_starts(rounds: Sequence[dict[str, Any]]) -> list[int]:
    """First block of every stage, read from the first round with scores, or [] when none has any.

    A round scores every pair of consecutive active blocks within a stage, so the active blocks that
    are never the later block of a pair open a stage.
    """
    for r, before in zip(rounds, mask_history(rounds)):
        if r["pairs"]:
            later = {b for _, b in r["pairs"]}
            return [i for i, on in enumerate(before) if on and i not in later]
    return []


def _width(rounds: Sequence[dict[str, Any]]) -> float:
    pairs = max((len(r["pairs"]) for r in rounds), default=0)
    blocks = len(rounds[0]["mask"])
    return min(max(11.0, 2 * (1.8 + 0.28 * pairs), 1.8 + 0.25 * blocks), 28.0)


def _mask_height(rounds: Sequence[dict[str, Any]]) -> float:
    return 1.5 + 0.32 * (len(rounds) + 1)


def pruning_figsize(rounds: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Figure size in inches: a row of two panels per round plus the mask panel."""
    return _width(rounds), 2.9 * len(rounds) + _mask_height(rounds) + 0.4


def _round_panels(ax_s, ax_m, r: dict[str, Any]) -> None:
    x = np.arange(len(r["pairs"]))
    labels = [f"{a}→{b}" for a, b in r["pairs"]]
    colors = [PRUNED if b in r["pruned"] else KEPT for _, b in r["pairs"]]
    scores = [np.nan if s is None or not math.isfinite(s) else float(s) for s in r["scores"]]
    ax_s.bar(x, np.nan_to_num(scores, nan=0.0), color=colors)
    for i, s in enumerate(scores):
        if not np.isfinite(s):
            ax_s.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    finite = [s for s in scores if np.isfinite(s)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
        ax_s.set_yscale("log")
    ax_s.set_ylabel("KL score (nats)")
    ax_m.bar(x, r["mapped"], color=colors)
    ax_m.set_ylim(0, 1.08)
    if r.get("tau") is not None:
        ax_m.axhline(r["tau"], color="black", linestyle="--", linewidth=1)
        ax_m.text(1.0, r["tau"], f" τ = {r['tau']:g}", transform=ax_m.get_yaxis_transform(), va="center", fontsize=8)
        ax_m.set_ylabel("EBQM-mapped value ã")
    else:
        ax_m.set_ylabel("decision (0 = prune)")
    for ax in (ax_s, ax_m):
        ax.set_xticks(x, labels, rotation=90 if len(x) > 12 else 0, fontsize=7 if len(x) > 12 else 8)
        ax.set_xlabel("block pair l → l' (ELA block indices)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.7, max(len(x), 1) - 0.3)
    for i, ((_, b), v) in enumerate(zip(r["pairs"], r["mapped"])):
        if b in r["pruned"]:  # a mapped value of 0 draws no bar: mark it
            ax_m.plot(i, v, marker="v", color=PRUNED, markersize=6, clip_on=False)
    if not len(x):
        ax_s.text(0.5, 0.5, "no pairs scored", transform=ax_s.transAxes, ha="center", va="center")
    if r.get("note"):
        ax_m.text(0.5, 0.5, r["note"], transform=ax_m.transAxes, ha="center", va="center", fontsize=8, wrap=True,
                  bbox=dict(facecolor="white", edgecolor="0.6"))
    pruned = ", ".join(map(str, r["pruned"][:12])) + (", ..." if len(r["pruned"]) > 12 else "") or "none"
    ax_s.set_title(f"round {r['round']} (epoch {r['epoch']}): KL of adjacent active blocks", fontsize=10, loc="left")
    ax_m.set_title(f"mapped values; pruned: {pruned}", fontsize=10, loc="left")

def _mask_panel(ax, rounds: Sequence[dict[str, Any]]) -> None:
    history = mask_history(rounds)
    grid = np.array(history, dtype=float)
    ax.imshow(grid, cmap=ListedColormap([OFF, ACTIVE]), vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for k, r in enumerate(rounds, start=1):
        for b in r["pruned"]:
            ax.plot(b, k, marker="x", color=PRUNED, markersize=7, markeredgewidth=2)
    n = grid.shape[1]
    for s in stage_starts(rounds)[1:]:
        ax.axvline(s - 0.5, color="black", linewidth=1.5)
    ax.set_xticks(np.arange(n)[:: max(1, math.ceil(n / 40))])
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(history)) + 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_yticks(range(len(history)), ["start"] + [f"after round {r['round']} (epoch {r['epoch']})" for r in rounds], fontsize=8)
    ax.set_xlabel("ELA block index (stage boundaries: black lines)")
    ax.set_title(f"ELA mask over rounds: active blocks {sum(history[0])}/{n} → {sum(history[-1])}/{n}", fontsize=10, loc="left")
    handles = [Patch(color=ACTIVE, label="active"), Patch(color=OFF, label="pruned"),
               Line2D([], [], marker="x", color=PRUNED, linestyle="none", markeredgewidth=2, label="pruned in this round")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def plot_pruning(rounds: Sequence[dict[str, Any]], *, title: str | None = None) -> Figure:
    """Per round: the pair scores and their mapped values against tau (pruned bars red); then the mask."""
    rounds = check_rounds(rounds)
    fig = new_figure(*pruning_figsize(rounds))
    heights = [2.9] * len(rounds) + [_mask_height(rounds)]
    grid = fig.add_gridspec(len(rounds) + 1, 2, height_ratios=heights)
    for k, r in enumerate(rounds):
        _round_panels(fig.add_subplot(grid[k, 0]), fig.add_subplot(grid[k, 1]), r)
    _mask_panel(fig.add_subplot(grid[-1, :]), rounds)
    fig.suptitle(title or "ELA pruning: KL divergence → EBQM → threshold τ → mask (red: pruned)")
    return fig


def draw_pruning(rounds: list[dict], out_dir: str | os.PathLike, *, fmt: str = "png", title: str | None = None) -> Path:
    """Draw every pruning round so far and the mask history to ``out_dir/pruning.<fmt>``.

    Args:
        rounds: the round reports of :meth:`elanet.PruningSchedule.decide` (``pruning.json['rounds']``).
        out_dir: folder to write into (created if missing).
        fmt: ``'png'`` or ``'svg'``.
        title: figure title.

    Returns:
        The path written.
    """
    check_format(fmt)
    return save_figure(plot_pruning(rounds, title=title), out_dir, "pruning", fmt)
