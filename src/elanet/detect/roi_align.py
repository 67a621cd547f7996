"""RoIAlign as two parallel sparse-dense products on CPU, and the multi-scale pooler of the detectors that uses it.

torchvision's CPU ``roi_align`` walks every (RoI, channel, bin, sample) on one thread, forward and
backward, and its backward recomputes the bilinear weights per channel: in the embedded detection job
the backward alone took a third of a training step on two cores. RoIAlign is linear in its input
(He et al., Mask R-CNN, §3: each bin averages bilinearly interpolated samples): with ``S`` the sparse
matrix of sample weights, at most 16 non-zeros per output bin (2x2 samples x 4 corners), the output
is ``S @ input`` and the gradient ``S^T @ grad_output``, both over channels-last rows ``[N*H*W, C]``.
:class:`RoIAlignFunction` builds ``S`` once per call (in bin order, so its CSR rows need no sort),
and ``S^T`` in the backward (sorted stably by pixel, so every pixel's gradient sums in a fixed
order). The weights follow torchvision's CPU kernel exactly (the ``aligned`` offset, the minimum RoI
size of 1 without it, samples outside ``[-1, size]`` dropped, clamping at the borders); the outputs
differ from torchvision's only by float rounding (another summation order).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

__all__ = ["roi_align", "RoIAlignFunction", "FastMultiScaleRoIAlign"]


def _axis_weights(start: Tensor, bin_size: Tensor, bins: int, ratio: int, size: int) -> tuple[Tensor, Tensor]:
    """Corner indices and weights along one axis: ``[K, bins, ratio, 2]`` each (low and high corner)."""
    steps = (torch.arange(ratio, dtype=start.dtype, device=start.device) + 0.5) / ratio
    pos = start[:, None, None] + bin_size[:, None, None] * (torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None] + steps)
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    weights = torch.stack((1.0 - frac, frac), -1) * valid.unsqueeze(-1).to(pos.dtype)
    return torch.stack((low, high), -1), weights


def _samples(rois: Tensor, shape: torch.Size, scale: float, out_h: int, out_w: int, ratio: int, aligned: bool) -> tuple[Tensor, Tensor]:
    """Every (k, ph, pw, sy, cy, sx, cx) in bin order: its flat pixel ``(n * H + y) * W + x`` and its weight.

    Bin ``(k, ph, pw)`` owns the ``4 * ratio**2`` consecutive entries starting at ``((k * out_h + ph) * out_w + pw) * 4 * ratio**2``.
    """
    n, _, h, w = shape
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    iy, wy = _axis_weights(y1, roi_h / out_h, out_h, ratio, h)  # [K, out_h, ratio, 2]
    ix, wx = _axis_weights(x1, roi_w / out_w, out_w, ratio, w)
    k = rois.shape[0]
    pixels = (rois[:, 0].long().view(k, 1, 1, 1, 1, 1, 1) * h + iy.view(k, out_h, 1, ratio, 2, 1, 1)) * w + ix.view(k, 1, out_w, 1, 1, ratio, 2)
    weights = wy.view(k, out_h, 1, ratio, 2, 1, 1) * wx.view(k, 1, out_w, 1, 1, ratio, 2) / (ratio * ratio)
    return pixels.reshape(-1), weights.reshape(-1)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch calls CSR support "beta"; the layout is valid by construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _sampling_matrix(pixels: Tensor, weights: Tensor, bins: int, pixel_count: int, per_bin: int) -> Tensor:
    """``S`` as a sparse CSR ``[bins, pixel_count]`` matrix: row (k, ph, pw) holds bin (ph, pw)'s sample weights.

    The samples come in bin order, so the rows need no sorting: every row has ``per_bin`` entries.
    """
    crow = torch.arange(0, bins * per_bin + 1, per_bin, device=pixels.device)
    return _csr(crow, pixels, weights, (bins, pixel_count))


def _sampling_matrix_t(pixels: Tensor, weights: Tensor, bins: int, pixel_count: int, per_bin: int) -> Tensor:
    """``S^T`` as a sparse CSR ``[pixel_count, bins]`` matrix: the samples sorted by pixel."""
    order = torch.argsort(pixels, stable=True)  # rows of S^T, in a fixed order (so sums repeat bit for bit); a pixel hit twice keeps two entries
    crow = torch.zeros(pixel_count + 1, dtype=torch.long, device=pixels.device)
    crow[1:] = torch.bincount(pixels, minlength=pixel_count).cumsum(0)
    return _csr(crow, torch.div(order, per_bin, rounding_mode="floor"), weights[order], (pixel_count, bins))


def _rows(t: Tensor) -> Tensor:
    """``[N, C, H, W]`` as ``[N*H*W, C]`` rows: a view of channels-last storage, a copy otherwise."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class RoIAlignFunction(torch.autograd.Function):
    """RoIAlign as ``S @ input`` forward and ``S^T @ grad`` backward over channels-last rows (module docstring)."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, rois: Tensor, scale: float, out_h: int, out_w: int, ratio: int, aligned: bool) -> Tensor:  # type: ignore[override]
        n, c, h, w = input.shape
        k = rois.shape[0]
        pixels, weights = _samples(rois, input.shape, scale, out_h, out_w, ratio, aligned)
        ctx.save_for_backward(pixels, weights)
        ctx.args = (input.shape, k * out_h * out_w, 4 * ratio * ratio)
        ctx.input_channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
        s = _sampling_matrix(pixels, weights, k * out_h * out_w, n * h * w, 4 * ratio * ratio)
        return (s @ _rows(input)).view(k, out_h, out_w, c).permute(0, 3, 1, 2)  # channels-last storage

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        pixels, weights = ctx.saved_tensors
        (n, c, h, w), bins, per_bin = ctx.args
        s_t = _sampling_matrix_t(pixels, weights, bins, n * h * w, per_bin)
        grad_input = (s_t @ _rows(grad).to(s_t.dtype)).view(n, h, w, c).permute(0, 3, 1, 2)  # channels-last storage
        if not ctx.input_channels_last:
            grad_input = grad_input.contiguous()
        return grad_input.to(grad.dtype), None, None, None, None, None, None


def roi_align(input: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` (``rois`` as ``[K, 5]``), on CPU as parallel sparse products.

    The sparse path (:class:`RoIAlignFunction`) takes a float32 CPU input with a fixed
    ``sampling_ratio > 0`` in eager mode; anything else (other devices and dtypes, adaptive sampling,
    tracing, ``torch.compile`` / ``torch.export``) goes to torchvision unchanged.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    if input.device.type == "cpu" and input.dtype == torch.float32 and sampling_ratio > 0 and rois.shape[0] > 0 \
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        return RoIAlignFunction.apply(input, rois.to(input.dtype), float(spatial_scale), int(out_h), int(out_w),
                                      int(sampling_ratio), bool(aligned))
    return tv_roi_align(input, rois, (out_h, out_w), spatial_scale, sampling_ratio, aligned)


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (FPN level per box, FPN paper eq. 1) with :func:`roi_align`.

    Same constructor, same outputs up to float rounding; each level's RoIAlign goes through
    :func:`roi_align`, which decides where the sparse products apply. Tracing and
    ``torch.compile`` / ``torch.export`` take torchvision's path unchanged.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            super().forward(x, boxes[:1], image_shapes)  # let torchvision infer the scales and level mapper once
        feats = [v for k, v in x.items() if k in self.featmap_names]
        ids = torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
        rois = torch.cat((ids, torch.cat(boxes)), 1)
        levels = self.map_levels(boxes)  # all zeros with a single level
        out = feats[0].new_zeros((len(rois), feats[0].shape[1]) + tuple(self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels == level).flatten()
            if idx.numel():
                out[idx] = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio).to(out.dtype)
        return out
