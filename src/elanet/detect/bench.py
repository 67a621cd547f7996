"""Training-step benchmark of detectors: plain, MRLA-L and ELA backbones at fixed pruned fractions.

The same protocol as :mod:`elanet.bench` (which holds the masks, the memory probe and the table):
every variant is built once and warmed up, then each timed round runs one training step of every
variant in a shuffled order, on the same batch of the synthetic COCO-format set, so that load from
other processes spreads over all variants alike. ``elanet bench --task detect`` is the command line.
"""
from __future__ import annotations

import os
import random
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..bench import SCHEMA, Variant, _versions, peak_memory, spread_mask
from ..models import create_model
from ..pruning import ela_blocks, set_mask
from .coco import CocoDetection, DetectionLoader, coco_paths
from .config import DETECT_PRESETS
from .detectors import create_detector
from .synthetic import make_synthetic_coco

__all__ = ["detect_variants", "run_detect_benchmark", "EMBEDDED_HEADS"]

# The embedded job's head sizes and RoI sampling, so the benchmark times the step `elanet detect train` runs.
EMBEDDED_HEADS = {k: DETECT_PRESETS["synthetic"][k] for k in (
    "fpn_channels", "box_head_dim", "mask_head_channels", "mask_head_convs", "rpn_post_nms_top_n_train",
    "box_batch_size_per_image", "box_positive_fraction")}


def detect_variants(depths: Sequence[int], *, fractions: Sequence[float] = (0.0, 0.5, 1.0)) -> list[Variant]:
    """Plain, MRLA-L and ELA at each pruned fraction (evenly spread masks) for every depth (50, 101)."""
    variants = []
    for d in dict.fromkeys(int(x) for x in depths):
        if d not in (50, 101):
            raise ValueError(f"detection backbones are ImageNet ResNets: use --depths 50 or 101, got {d}")
        variants += [Variant(f"resnet{d}", d, "plain"), Variant(f"resnet{d}_mrla_l", d, "MRLA-L")]
        ela = create_model(f"resnet{d}_ela", num_classes=0)
        prunable = sum(not m.first_in_stage for m in ela_blocks(ela))
        for f in fractions:
            mask = spread_mask(ela, f)
            variants.append(Variant(f"resnet{d}_ela", d, f"ELA {100 * f:g}%", mask, mask.count(False) / prunable))
    return variants


def _gmacs(model: torch.nn.Module, image: torch.Tensor) -> float:
    """Multiply-accumulates of one inference forward on ``image`` (torch.utils.flop_counter / 2)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model([image])
    model.train()
    return counter.get_total_flops() / 2e9


def run_detect_benchmark(
    variants: Sequence[Variant],
    *,
    detector: str = "mask_rcnn",
    batch_size: int = 4,
    image_size: int = 128,
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time one training step (forward with losses, backward, SGD) of each variant's detector, interleaved.

    Returns the same JSON-ready report as :func:`elanet.bench.run_benchmark`.
    """
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, steps >= 1, warmup >= 0, got {batch_size}, {steps}, {warmup}")
    device = torch.device(device)
    root = make_synthetic_coco(seed=0)
    data = CocoDetection(*coco_paths(root, "train2017"), masks=detector == "mask_rcnn")
    images, targets = next(iter(DetectionLoader(data, batch_size, train=True, seed=seed)))
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    runners = []
    for v in variants:
        torch.manual_seed(seed)
        model = create_detector(detector, backbone=v.model, num_classes=data.num_classes, min_size=image_size,
                                max_size=image_size, **EMBEDDED_HEADS).to(device)
        if v.mask is not None:
            set_mask(model, v.mask)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002, momentum=0.9, weight_decay=1e-4)
        runners.append((model.train(), opt))

    def step(i: int) -> None:
        model, opt = runners[i]
        opt.zero_grad(set_to_none=True)
        sum(model(images, targets).values()).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[list[float]] = [[] for _ in variants]
    order, rng = list(range(len(variants))), random.Random(seed)
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    for r in range(warmup + steps):
        rng.shuffle(order)
        for i in order:
            t = time.perf_counter()
            step(i)
            if r >= warmup:
                times[i].append(time.perf_counter() - t)
        load.append(os.getloadavg()[0])
        if log is not None:
            log(f"round {r + 1}/{warmup + steps} ({'warm-up' if r < warmup else 'timed'}) done after {time.perf_counter() - start:.0f} s")
    results = []
    for i, (v, ts) in enumerate(zip(variants, times)):
        model = runners[i][0]
        results.append({
            "model": v.model, "detector": detector, "depth": v.depth, "variant": v.label, "pruned_fraction": v.pruned_fraction,
            "active_ela_blocks": sum(m.active for m in ela_blocks(model)) if v.mask is not None else None,
            "median_step_s": statistics.median(ts), "min_step_s": min(ts), "step_times_s": ts,
            "peak_memory_bytes": int(peak_memory(lambda: step(i), device)),
            "gmacs": _gmacs(model, images[0]), "mparams": sum(p.numel() for p in model.parameters()) / 1e6,
        })
    return {
        "schema": SCHEMA, "task": "detect", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"detector": detector, "batch_size": batch_size, "image_size": image_size, "steps": steps,
                     "warmup": warmup, "device": str(device), "threads": torch.get_num_threads(), "seed": seed,
                     "data": "synthetic digits (COCO format), first training batch",
                     "optimizer": "SGD(lr=0.002, momentum=0.9, weight_decay=1e-4)", "heads": EMBEDDED_HEADS,
                     "gmacs": "one inference forward of one image at image_size (backbone, FPN, RPN, heads)"},
        "machine": {"cpu_count": os.cpu_count(), "loadavg_1min": load,
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "versions": _versions(),
        "results": results,
    }
