"""Layer-attention heatmaps per stage (paper Figures 2a, 6 and 7), pruned blocks marked."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torch import Tensor, nn

from ..attention import AttentionRecord, MRLABase, record_attention
from ..pruning import adjacent_kl
from .figure import check_format, new_figure, save_figure

__all__ = ["StageAttention", "record_eval", "mean_attention", "adjacent_block_kl", "attention_figsize", "plot_attention", "draw_attention"]

PRUNED = dict(facecolor="0.88", edgecolor="0.55", hatch="///", linewidth=0.0)


@dataclass
class StageAttention:
    """Mean attention of one stage: ``weights[t, s]`` is the mean over images and heads of alpha_{t,s}.

    Attributes:
        stage: 0-based stage index.
        blocks: model-wide block index (as in the ELA mask) of each block of the stage, in order.
        active: whether each block retrieves (False: pruned).
        weights: ``[n, n]`` with rows = blocks t, columns = layers s of the stage at their true
            positions; NaN where t is pruned, s is pruned, or s comes after t.
        images: number of images averaged.
        heads: attention heads of the stage.
    """

    stage: int
    blocks: list[int]
    active: list[bool]
    weights: np.ndarray
    images: int
    heads: int


def _attention_modules(model: nn.Module) -> list[MRLABase]:
    mods = sorted((m for m in model.modules() if isinstance(m, MRLABase)), key=lambda m: m.block_index)
    if not mods:
        raise ValueError("model has no MRLA-B / ELA blocks, so it has no layer-attention weights to draw: "
                         "use a '_mrla_b' or '_ela' model")
    return mods


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def record_eval(model: nn.Module, images: Tensor) -> tuple[AttentionRecord, Tensor]:
    """One eval-mode, no-grad forward pass under :func:`record_attention`; the model's mode is restored.

    Returns:
        The record and the logits.
    """
    was_training = model.training
    model.eval()
    try:
        with record_attention(model) as rec:
            logits = model(images.to(_device(model)))
    finally:
        model.train(was_training)
    return rec, logits


def _stages(mods: list[MRLABase], rec: AttentionRecord) -> list[StageAttention]:
    by_stage: dict[int, list[MRLABase]] = {}
    for m in mods:
        by_stage.setdefault(m.stage_index, []).append(m)
    out = {}
    for s, ms in sorted(by_stage.items()):
        n = len(ms)
        out[s] = StageAttention(s, [m.block_index for m in ms], [m.active for m in ms], np.full((n, n), np.nan), 0, 0)
    for b, s, w in zip(rec.blocks, rec.stages, rec.weights):
        st = out[s]
        t = st.blocks.index(b)
        cols = [j for j in range(t + 1) if st.active[j]]  # the layers block t attended: active ones up to itself
        if w.shape[-1] != len(cols):
            raise RuntimeError(f"block {b} attended {w.shape[-1]} layers but its stage has {len(cols)} active layers up to it")
        st.weights[t, cols] = w.float().mean((0, 1)).cpu().numpy()
        st.images, st.heads = int(w.shape[0]), int(w.shape[1])
    return list(out.values())


def mean_attention(model: nn.Module, images: Tensor) -> list[StageAttention]:
    """Mean layer-attention distribution of every active block over ``images`` and heads, per stage.

    Block t's distribution alpha_t (paper eq. 5) covers the active layers 1..t of its stage; it is
    placed at those layers' true positions. The model runs once in eval mode without gradients.
    """
    mods = _attention_modules(model)
    rec, _ = record_eval(model, images)
    return _stages(mods, rec)


def adjacent_block_kl(rec: AttentionRecord) -> dict[int, tuple[int, float]]:
    """KL divergence D(alpha_l || alpha_l') of each recorded block l' to the previous active block l
    of its stage (paper eq. 11), averaged over samples and heads.

    Returns:
        ``{l': (l, divergence)}``; stage-first blocks have no entry.
    """
    out = {}
    for i in range(1, len(rec.blocks)):
        if rec.stages[i] == rec.stages[i - 1]:
            kl = adjacent_kl(rec.weights[i - 1], rec.weights[i]).mean()
            out[rec.blocks[i]] = (rec.blocks[i - 1], float(kl))
    return out


def _panel_width(n: int) -> float:
    return 2.3 + 0.45 * n


def attention_figsize(sizes: list[int]) -> tuple[float, float]:
    """Figure size in inches for stages of ``sizes`` blocks: one heatmap panel (plus colour bar) each."""
    return sum(_panel_width(n) for n in sizes), max(3.6, 1.9 + 0.45 * max(sizes))


def _draw_stage(fig: Figure, ax, st: StageAttention) -> None:
    n = len(st.blocks)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    # a block attending one layer has weight 1 there: scale colours by the rows with a real choice
    rows = st.weights[np.isfinite(st.weights).sum(1) > 1]
    vmax = float(np.nanmax(rows)) if rows.size else 1.0
    im = ax.imshow(np.ma.masked_invalid(st.weights), cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal")
    for t in range(n):
        for s in range(t + 1):
            if not st.active[t] or not st.active[s]:
                ax.add_patch(Rectangle((s - 0.5, t - 0.5), 1, 1, **PRUNED))
            elif n <= 8:
                v = st.weights[t, s]
                ax.text(s, t, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 * vmax else "white")
        if not st.active[t]:
            ax.text((n - 1) / 2, t, "pruned", ha="center", va="center", fontsize=8, style="italic", color="0.25",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    labels = [str(j + 1) for j in range(n)]
    ax.set_xticks(range(n), labels, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for lab, on in zip(ticks, st.active):
            if not on:
                lab.set_color("0.6")
    ax.set_xlabel("attended layer s (position in stage)")
    ax.set_ylabel("block t (position in stage)")
    ax.set_title(f"stage {st.stage + 1}: blocks {st.blocks[0]}–{st.blocks[-1]}, "
                 f"{sum(st.active)}/{n} active", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.85, extend="max" if vmax < 1 else "neither",
                 label="mean attention weight α (probability)")


def plot_attention(stages: list[StageAttention], *, title: str | None = None) -> Figure:
    """One heatmap per stage: rows are blocks t, columns the layers s they attend to.

    Pruned blocks are hatched grey (their row, and their column: nobody retrieves them).
    """
    sizes = [len(st.blocks) for st in stages]
    fig = new_figure(*attention_figsize(sizes))
    axes = fig.subplots(1, len(stages), squeeze=False, gridspec_kw={"width_ratios": [_panel_width(n) for n in sizes]})[0]
    for ax, st in zip(axes, stages):
        _draw_stage(fig, ax, st)
    images = max(st.images for st in stages)
    fig.suptitle(title or f"Mean layer attention over {images} image{'s' * (images != 1)} and all heads "
                 "(block index = ELA mask index)")
    if not all(all(st.active) for st in stages):
        fig.legend(handles=[Patch(label="pruned block (no retrieval)", **PRUNED)], loc="outside lower center", fontsize=8)
    return fig


def draw_attention(model: nn.Module, images: Tensor, out_dir: str | os.PathLike, *, fmt: str = "png",
                   title: str | None = None) -> Path:
    """Draw the per-stage mean attention heatmaps of ``model`` on ``images`` to ``out_dir/attention.<fmt>``.

    The model runs once in eval mode under ``torch.no_grad`` with :func:`elanet.record_attention`
    (pass the module itself, not a ``torch.compile`` wrapper); its train/eval mode is restored.

    Args:
        model: a model with MRLA-B / ELA blocks.
        images: a normalised batch ``[B, C, H, W]`` (moved to the model's device).
        out_dir: folder to write into (created if missing).
        fmt: ``'png'`` or ``'svg'``.
        title: figure title (default: what is averaged).

    Returns:
        The path written.
    """
    check_format(fmt)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty batch [B, C, H, W], got shape {tuple(images.shape)}")
    stages = mean_attention(model, images)
    return save_figure(plot_attention(stages, title=title), out_dir, "attention", fmt)
