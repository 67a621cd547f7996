"""Detection on the training core: the task's data, model, step, COCO evaluation and metrics.

Everything else -- run folder, pruning schedule (record, accumulate, decide, re-wrap DDP), checkpoints,
resume, signals, DDP -- is :func:`elanet.training.core.fit`, the same as for classification.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn

from ..models.pretrained import load_pretrained, resolve_source
from ..pruning import ela_blocks, set_mask
from ..training.checkpoint import load_checkpoint
from ..training.core import Context, Parts, fit
from .coco import CocoDetection, DetectionLoader, coco_paths
from .config import DetectConfig
from .detectors import create_detector, freeze_stages
from .evaluate import STATS, evaluate_detector, load_coco_gt, predict

__all__ = ["Detection", "train_detector", "load_backbone", "detector_from_checkpoint", "draw_predictions", "LOSSES"]

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def load_backbone(model: nn.Module, source: str | os.PathLike, *, backbone: str, keep_mask: bool,
                  frozen_stages: int) -> dict[str, Any] | None:
    """Load pretrained weights into the detector's backbone (its classifier is dropped).

    ``source`` is an elanet classification checkpoint (or run folder), whose ELA mask comes with its
    weights (every block starts active again unless ``keep_mask``), or anything
    :func:`elanet.load_pretrained` takes (torchvision / timm weights, ``'timm:resnet50c'``, a state-dict
    file). The stage freezing is reapplied afterwards (switching a block on makes it trainable).
    """
    body = model.backbone.body
    try:
        ckpt = load_checkpoint(source)
    except (ValueError, FileNotFoundError, IsADirectoryError):  # not an elanet checkpoint: backbone weights
        state = {k: v for k, v in resolve_source(source).items() if not k.startswith(("fc.", "head.fc."))}
        load_pretrained(body, state)
        freeze_stages(body, frozen_stages)
        return None
    if ckpt.get("model_name") != backbone:
        raise ValueError(f"--pretrained {source} holds {ckpt.get('model_name')} but the backbone is {backbone}: "
                         f"pass --model {ckpt.get('model_name')} or another checkpoint")
    own = body.state_dict()
    state = _adapt_stem({k: v for k, v in ckpt["model"].items() if not k.startswith("fc.")}, own)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"--pretrained {source} does not fit {backbone}: shapes differ: {', '.join(shapes[:3])}; "
                         "pass a checkpoint of the same model and input channels")
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--pretrained {source} does not fit {backbone}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if not keep_mask and ela_blocks(body):
        set_mask(body, [True] * len(ela_blocks(body)))
    freeze_stages(body, frozen_stages)
    return ckpt


def _adapt_stem(state: dict[str, Any], own: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The stem convolution of a checkpoint trained on other input channels (e.g. grey digits, 1 channel)
    adapted to the detector's images with timm's ``adapt_input_conv`` (channels repeated and rescaled)."""
    stem = next((k for k, v in own.items() if v.dim() == 4), None)  # the first convolution's weight
    w = state.get(stem)
    if w is not None and w.dim() == 4 and w.shape[1] != own[stem].shape[1] and w.shape[:1] + w.shape[2:] == own[stem].shape[:1] + own[stem].shape[2:]:
        state = {**state, stem: adapt_input_conv(own[stem].shape[1], w, base_chans=w.shape[1])}
    return state


def head_sizes(cfg: DetectConfig) -> dict[str, Any]:
    """The :func:`create_detector` arguments that shape a run's heads (saved in its checkpoints to rebuild it)."""
    sizes = {k: getattr(cfg, k) for k in ("fpn_channels", "box_head_dim", "mask_head_channels", "mask_head_convs", "roi_canonical_scale",
                                        "rpn_post_nms_top_n_test")}
    return {**sizes, "anchor_sizes": [int(a) for a in cfg.anchor_sizes]}


def _clip(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any, *, max_norm: float) -> None:
    """Optimizer step pre-hook: clip the gradient norm of every parameter the optimizer steps."""
    nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], max_norm)


class Detection:
    """Faster / Mask R-CNN training on COCO-format data with COCO evaluation after every epoch."""

    best = ("bbox_AP", "segm_AP")
    command = "detect train"  # what the stop message tells the user to resume with

    def __init__(self, cfg: DetectConfig) -> None:
        self.cfg = cfg
        self.masks = cfg.detector == "mask_rcnn"
        kinds = ("bbox", "segm") if self.masks else ("bbox",)
        self.losses = LOSSES if self.masks else tuple(k for k in LOSSES if k != "loss_mask")
        self.aps = tuple(f"{k}_{s}" for k in kinds for s in STATS)
        self.columns = ("train_loss", *self.losses, *self.aps)
        if not self.masks:
            self.best = ("bbox_AP",)

    def setup(self, cfg: DetectConfig, ctx: Context) -> Parts:
        self.ctx = ctx
        if cfg.data_dir is None:
            from .synthetic import make_synthetic_coco

            root = make_synthetic_coco(seed=0)
        else:
            root = Path(cfg.data_dir)
        train = CocoDetection(*coco_paths(root, cfg.train_split), masks=self.masks, flip=cfg.flip, seed=cfg.seed)
        self.val = val = CocoDetection(*coco_paths(root, cfg.val_split), masks=self.masks)
        if val.category_ids != train.category_ids:
            raise ValueError(f"{val.ann_file} and {train.ann_file} list different categories: use the files of one dataset")
        for ds in (train, val):
            if ds.dropped:
                ctx.log(f"{ds.ann_file.name}: dropped {ds.dropped} degenerate box(es) (narrower or shorter than 1 px inside the image)")
        info = ctx.info
        model = create_detector(
            cfg.detector, backbone=cfg.model, num_classes=train.num_classes, pretrained=cfg.pretrained is not None,
            frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval, norm=cfg.norm, drop_path=cfg.drop_path,
            min_size=cfg.min_size, max_size=cfg.max_size, **head_sizes(cfg), rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            box_batch_size_per_image=cfg.box_batch_size_per_image, box_positive_fraction=cfg.box_positive_fraction)
        if cfg.pretrained is not None:
            frozen = cfg.frozen_stages if cfg.frozen_stages is not None else 1
            load_backbone(model, cfg.pretrained, backbone=cfg.model, keep_mask=cfg.keep_mask, frozen_stages=frozen)
        model.to(ctx.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.grad_clip > 0:  # clip just before each step (after GradScaler has unscaled the gradients)
            optimizer.register_step_pre_hook(partial(_clip, max_norm=cfg.grad_clip))
        self.train_loader = DetectionLoader(train, cfg.batch_size, train=True, rank=info.rank, world_size=info.world_size,
                                            seed=cfg.seed, workers=cfg.workers)
        self.val_loader = DetectionLoader(val, cfg.batch_size, train=False, rank=info.rank, world_size=info.world_size,
                                          workers=cfg.workers)
        self.gt = load_coco_gt(val.ann_file) if info.main else None
        self.classes, self.category_ids = train.classes, train.category_ids
        ctx.log(f"{cfg.detector} on {cfg.model} | {len(train)} training / {len(val)} validation images, "
                f"{train.num_classes - 1} classes | {root}")
        return Parts(model, optimizer, self.train_loader)

    def train_step(self, net: nn.Module, batch: tuple[list[Tensor], list[dict[str, Tensor]]]) -> tuple[Tensor, Tensor]:
        device = self.ctx.device
        images = [im.to(device, non_blocking=True) for im in batch[0]]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch[1]]
        losses = net(images, targets)
        loss = sum(losses[k].float() for k in self.losses)
        d = loss.detach()
        return loss, torch.stack([d, *(losses[k].detach().float() for k in self.losses), d.new_tensor(1.0)])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = self.ctx.run if self.ctx.info.main else None
        m = evaluate_detector(model, self.val_loader, masks=self.masks, amp=self.cfg.amp, out_dir=out, gt=self.gt)
        return {k: m[k] for k in self.aps}

    def row(self, train: list[float], test: dict[str, float]) -> list[float]:
        n = train[-1]
        return [v / n for v in train[:-1]] + [test[k] for k in self.aps]

    def describe(self, v: dict[str, float]) -> str:
        text = f"loss {v['train_loss']:.4f} | box AP {v['bbox_AP']:.1f} AP50 {v['bbox_AP50']:.1f}"
        return text + (f" | mask AP {v['segm_AP']:.1f} AP50 {v['segm_AP50']:.1f}" if self.masks else "")

    def describe_best(self, summary: dict[str, Any]) -> str:
        text = f"best box AP {summary['best_bbox_AP']:.1f}"
        return text + (f", mask AP {summary['best_segm_AP']:.1f}" if self.masks else "") + f" (epoch {summary['best_epoch']})"

    def checkpoint_meta(self) -> dict[str, Any]:
        c = self.cfg
        return {"task": "detect", "detector": c.detector, "num_classes": len(self.classes) + 1, "classes": list(self.classes),
                "category_ids": list(self.category_ids), "min_size": c.min_size, "max_size": c.max_size, "norm": c.norm,
                "heads": head_sizes(c)}

    def finish(self, model: nn.Module, ctx: Context) -> None:
        if self.cfg.predictions:
            draw_predictions(model, self.val, range(min(self.cfg.predictions, len(self.val))), ctx.run / "predictions",
                             self.classes, amp=self.cfg.amp)


def draw_predictions(model: nn.Module, dataset: CocoDetection, indices, out: Path, classes, *, amp: str = "none") -> list[Path]:
    """Draw the predictions of ``model`` on ``dataset[i]`` for each index into ``out/<file name>.png``."""
    from .draw import draw_prediction, save_image

    paths = []
    for i in indices:
        img = dataset.read_image(i)
        pred = predict(model, [img], amp=amp)[0]
        name = Path(dataset.images[i]["file_name"]).stem
        paths.append(save_image(draw_prediction(img, pred, classes), out / f"{name}.png"))
    return paths


def train_detector(
    cfg: DetectConfig,
    *,
    resume: str | os.PathLike | None = None,
    on_step: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a detector as ``cfg`` says (ELA pruning included); returns the run summary.

    Args:
        cfg: a validated :class:`DetectConfig` (the run's own on resume).
        resume: a run folder to continue from its ``last.pt``.
        on_step: called as ``on_step(epoch, step)`` after every optimiser step.
        log: where the epoch lines and pruning tables go (rank 0 only).
    """
    return fit(Detection(cfg), cfg, resume=resume, on_step=on_step, log=log)


def detector_from_checkpoint(ckpt: dict[str, Any], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the detector of an ``elanet detect train`` checkpoint, weights and ELA mask included."""
    if ckpt.get("task") != "detect":
        raise ValueError("this is not a detection checkpoint (written by `elanet detect train`); classification "
                         "checkpoints are evaluated with `elanet eval`")
    model = create_detector(ckpt["detector"], backbone=ckpt["model_name"], num_classes=ckpt["num_classes"],
                            norm=ckpt["norm"], min_size=ckpt["min_size"], max_size=ckpt["max_size"], **ckpt.get("heads", {}))
    model.load_state_dict(ckpt["model"])  # each ELA block's `active` flag travels as module extra state
    return model.to(device).eval()
