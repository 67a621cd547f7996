"""Score-CAM maps of blocks' attention outputs (paper Figures 3 and 5), implemented here.

Score-CAM (Wang et al., 2020) explains a class score with a layer's activation maps A^k and no
gradients. elanet's variant, step by step, for one image X and target class c:

1. forward X once and keep A = the layer's output ``[K, h, w]``;
2. upsample every channel to the input size (bilinear): U^k; min-max normalise it to H^k in [0, 1];
3. score each channel by the target-class logit of the masked input: s_k = f_c(X * H^k)
   (X is the normalised input, so masked pixels become the dataset mean);
4. weights w = softmax over channels of s; a constant channel has no location to show and gets
   weight 0 (it is left out of the softmax);
5. map L = ReLU(sum_k w_k U^k) at the input resolution (upsampling is linear, so this is the
   weighted activation upsampled before the ReLU).

We use the softmax of the target logit (not the increase of confidence against a baseline
image): it needs no baseline choice and its weights sum to 1.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..attention import MRLABase, MRLALight
from .attention import _device, adjacent_block_kl, record_eval
from .figure import check_format, new_figure, save_figure

__all__ = ["CamResult", "score_cam", "attention_blocks", "default_blocks", "scorecam_figsize", "plot_scorecam", "draw_scorecam"]

MAX_COLS = 7


@dataclass
class CamResult:
    """A Score-CAM map and how it was made.

    Attributes:
        cam: ``[H, W]`` map at the input resolution, >= 0 (not normalised).
        target: the explained class.
        probability: softmax probability of ``target`` on the clean image.
        weights: ``[K]`` channel weights (sum to 1 unless every channel is constant).
        scores: ``[K]`` target logit of each masked input (NaN for constant channels).
    """

    cam: Tensor
    target: int
    probability: float
    weights: Tensor
    scores: Tensor

    def normalised(self) -> Tensor:
        """The map divided by its maximum (all zeros stay zeros), for display."""
        m = self.cam.max()
        return self.cam / m if m > 0 else self.cam


@torch.no_grad()
def _score_cam(model: nn.Module, image: Tensor, layer: nn.Module, target: int | None, batch_size: int) -> CamResult:
    acts: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
    try:
        logits = model(image)
    finally:
        handle.remove()
    if len(acts) != 1 or acts[0].ndim != 4:
        raise ValueError("the layer must run exactly once per forward pass and return a [B, K, h, w] map")
    probs = logits.float().softmax(-1)[0]
    if target is None:
        target = int(probs.argmax())
    if not 0 <= target < probs.numel():
        raise ValueError(f"target class {target} out of range: the model has {probs.numel()} classes")
    up = F.interpolate(acts[0].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0]  # [K, H, W]
    lo = up.amin((1, 2), keepdim=True)
    span = up.amax((1, 2), keepdim=True) - lo
    varies = span.flatten() > 0
    masks = (up - lo) / span.clamp_min(torch.finfo(up.dtype).tiny)
    scores = torch.full((up.shape[0],), float("nan"), device=up.device)
    idx = varies.nonzero().flatten()
    for chunk in idx.split(batch_size):
        masked = image * masks[chunk].unsqueeze(1).to(image.dtype)  # [n, C, H, W]
        scores[chunk] = model(masked).float()[:, target]
    weights = torch.zeros_like(scores)
    if len(idx):
        weights[idx] = scores[idx].softmax(0)
    cam = F.relu((weights[:, None, None] * up).sum(0))
    return CamResult(cam.cpu(), target, float(probs[target]), weights.cpu(), scores.cpu())


def score_cam(model: nn.Module, image: Tensor, layer: nn.Module, *, target: int | None = None,
              batch_size: int = 64) -> CamResult:
    """Score-CAM of ``layer``'s output for one image (Wang et al., 2020; see the module docstring).

    The model runs in eval mode without gradients; its train/eval mode is restored.

    Args:
        model: a classifier returning logits ``[B, classes]``.
        image: normalised ``[C, H, W]`` or ``[1, C, H, W]``.
        layer: a module of ``model`` returning ``[B, K, h, w]``, run once per forward pass.
        target: class to explain (default: the predicted class).
        batch_size: masked inputs per forward pass.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [C, H, W] or [1, C, H, W], got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        return _score_cam(model, image.to(_device(model)), layer, target, batch_size)
    finally:
        model.train(was_training)


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of ``model`` that carry a layer-attention module ``.attn``, in forward order.

    A block's position in this list is its block index (the ELA mask index for MRLA-B / ELA models).
    """
    blocks = [m for m in model.modules() if isinstance(getattr(m, "attn", None), (MRLABase, MRLALight))]
    if not blocks:
        raise ValueError("model has no layer-attention blocks: Score-CAM of attention outputs needs an "
                         "'_mrla_l', '_mrla_b' or '_ela' model")
    return blocks


def default_blocks(model: nn.Module, *, limit: int = 6) -> list[int]:
    """Every block of the last stage, or ``limit`` of them evenly spread when it has more."""
    blocks = attention_blocks(model)
    stages = getattr(model, "stages", None)
    last = {id(b) for b in stages[-1]} if stages else {id(b) for b in blocks}
    picked = [i for i, b in enumerate(blocks) if id(b) in last] or list(range(len(blocks)))
    if len(picked) > limit:
        picked = [picked[round(j)] for j in np.linspace(0, len(picked) - 1, limit)]
    return picked


def _stage_of(model: nn.Module, block: nn.Module) -> int | None:
    for s, stage in enumerate(getattr(model, "stages", []) or []):
        if any(b is block for b in stage):
            return s
    return None


def scorecam_figsize(panels: int) -> tuple[float, float]:
    """Figure size in inches for ``panels`` pictures (the image plus one map per block)."""
    cols = min(panels, MAX_COLS)
    rows = math.ceil(panels / cols)
    return 2.3 * cols + 1.0, 2.7 * rows + 0.7


def _titles(model: nn.Module, image: Tensor, blocks: list[nn.Module], chosen: list[int]) -> list[str]:
    kl: dict[int, tuple[int, float]] = {}
    if any(isinstance(m, MRLABase) for m in model.modules()):
        rec, _ = record_eval(model, image)
        kl = adjacent_block_kl(rec)
    titles = []
    for i in chosen:
        attn = blocks[i].attn
        s = _stage_of(model, blocks[i])
        head = f"block {i}" + (f" (stage {s + 1})" if s is not None else "")
        if isinstance(attn, MRLALight):
            note = "MRLA-L: no layer distribution"
        elif not attn.active:
            note = "pruned: no retrieval"
        elif i in kl:
            note = f"KL to block {kl[i][0]} = {kl[i][1]:.3g}"
        else:
            note = "first active in stage"
        titles.append(f"{head}\n{note}")
    return titles


def plot_scorecam(display: np.ndarray, cams: list[CamResult], titles: list[str], *,
                  classes: Sequence[str] | None = None) -> Figure:
    """The image, then each block's normalised Score-CAM map overlaid on it."""
    n = 1 + len(cams)
    fig = new_figure(*scorecam_figsize(n))
    cols = min(n, MAX_COLS)
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).flatten()
    cmap = "gray" if display.ndim == 2 else None
    axes[0].imshow(display, cmap=cmap, vmin=0, vmax=1)
    c = cams[0] if cams else None
    label = ""
    if c is not None:
        label = f"class {c.target}" + (f" ({classes[c.target]})" if classes and c.target < len(classes) else "")
    axes[0].set_title(f"input ({display.shape[0]}×{display.shape[1]} px)\n{label}"
                      + (f", p = {c.probability:.2f}" if c else ""), fontsize=9)
    im = None
    for ax, cam, title in zip(axes[1:], cams, titles):
        ax.imshow(display, cmap=cmap, vmin=0, vmax=1)
        im = ax.imshow(cam.normalised().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[:n]), shrink=0.8, label="Score-CAM (÷ max of each map)")
    fig.suptitle("Score-CAM of attention outputs o_t (weights: softmax over channels of the class logit)", fontsize=10)
    return fig


def draw_scorecam(model: nn.Module, image: Tensor, out_dir: str | os.PathLike, *, blocks: Sequence[int] | None = None,
                  target: int | None = None, display: np.ndarray | None = None, fmt: str = "png",
                  batch_size: int = 64, classes: Sequence[str] | None = None) -> Path:
    """Score-CAM maps of the chosen blocks' attention outputs for one image, to ``out_dir/scorecam.<fmt>``.

    A block's attention output is what its MRLA-B / MRLA-L module returns (captured with a forward
    hook on ``block.attn``). Each map is titled with the KL divergence between the block's attention
    distribution and the previous active block's on this image (paper Figure 3), when the model has one.

    Args:
        model: a model with layer-attention blocks.
        image: normalised ``[C, H, W]`` or ``[1, C, H, W]``.
        out_dir: folder to write into.
        blocks: block indices (see :func:`attention_blocks`); default :func:`default_blocks`.
        target: class to explain (default: the predicted class).
        display: the image as ``[H, W]`` or ``[H, W, 3]`` in [0, 1] for the background (default: the
            input min-max scaled).
        fmt: ``'png'`` or ``'svg'``.
        batch_size: masked inputs per forward pass.
        classes: class names, for the title.

    Returns:
        The path written.
    """
    check_format(fmt)
    all_blocks = attention_blocks(model)
    chosen = list(default_blocks(model) if blocks is None else blocks)
    if not chosen:
        raise ValueError("no blocks chosen: pass block indices, e.g. --blocks 6 7 8")
    bad = [i for i in chosen if not 0 <= i < len(all_blocks)]
    if bad:
        raise ValueError(f"block index {bad[0]} out of range: the model has blocks 0..{len(all_blocks) - 1}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    cams = [score_cam(model, image, all_blocks[i].attn, target=target, batch_size=batch_size) for i in chosen]
    if display is None:
        x = image[0].float().cpu()
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        display = x.permute(1, 2, 0).numpy() if x.shape[0] == 3 else x.mean(0).numpy()
    fig = plot_scorecam(display, cams, _titles(model, image, all_blocks, chosen), classes=classes)
    return save_figure(fig, out_dir, "scorecam", fmt)
