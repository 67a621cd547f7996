"""COCO evaluation with pycocotools: results files and bbox / segm AP, AP50, AP75, APs, APm, APl."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["STATS", "load_coco_gt", "to_coco_results", "coco_evaluate", "predict", "evaluate_detector"]

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six of COCOeval.stats, in percent


def load_coco_gt(ann_file: str | os.PathLike):
    """A ``pycocotools.coco.COCO`` ground truth, without its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def to_coco_results(outputs: Sequence[dict[str, Tensor]], image_ids: Sequence[int], category_ids: Sequence[int],
                    *, masks: bool, mask_threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """Detector outputs (original image coordinates) as COCO results lists ``(bbox, segm)``.

    Boxes become ``[x, y, w, h]``, labels 1..K become the dataset's category ids, and each mask
    probability map is thresholded at ``mask_threshold`` and RLE-encoded (``counts`` as text).
    """
    from pycocotools import mask as mask_utils

    bbox, segm = [], []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        cats = [int(category_ids[int(i) - 1]) for i in out["labels"].cpu()]
        for b, s, c in zip(xywh, scores, cats):
            bbox.append({"image_id": int(image_id), "category_id": c, "bbox": [round(v, 2) for v in b], "score": round(s, 5)})
        if masks:
            binary = (out["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
            for rle, s, c in zip(rles, scores, cats):
                segm.append({"image_id": int(image_id), "category_id": c, "score": round(s, 5),
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return bbox, segm


def coco_evaluate(gt, results: list[dict], iou_type: str, *, image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCOeval of ``results`` against ``gt`` (a COCO object); AP values in percent.

    An empty ``results`` list scores 0 wherever the ground truth has objects (pycocotools cannot
    load an empty list). A size range without ground-truth objects gives -1, as in COCOeval.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    with contextlib.redirect_stdout(io.StringIO()) as text:
        dt = gt.loadRes(results) if results else None
        if dt is None:  # empty prediction list: a ground truth-only evaluation, all recalls are zero
            from pycocotools.coco import COCO

            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: (-1.0 if v < 0 else 100.0 * float(v)) for k, v in zip(STATS, ev.stats[:6])}
    out["summary"] = text.getvalue().strip()  # type: ignore[assignment]
    return out


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[Tensor], *, amp: str = "none") -> list[dict[str, Tensor]]:
    """Inference on a list of float ``[3, H, W]`` images in [0, 1]; outputs on the CPU in float32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        ctx = contextlib.nullcontext() if amp == "none" else torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        with ctx:
            outs = model([im.to(device) for im in images])
    finally:
        model.train(was_training)
    return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outs]


def evaluate_detector(model: nn.Module, loader, *, masks: bool, amp: str = "none", out_dir: str | os.PathLike | None = None,
                      gt=None) -> dict[str, float]:
    """Predict every image of ``loader`` (each rank its shard), then COCOeval on rank 0.

    Returns ``bbox_AP``, ``bbox_AP50``, ... and, with ``masks``, ``segm_AP``, ...; every rank gets the
    same numbers. ``out_dir`` receives ``bbox.json`` (and ``segm.json``) in COCO results format.
    """
    dataset = loader.dataset
    bbox, segm = [], []
    for images, targets in loader.iter_from(0):
        outs = predict(model, images, amp=amp)
        b, s = to_coco_results(outs, [int(t["image_id"]) for t in targets], dataset.category_ids, masks=masks)
        bbox += b
        segm += s
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (bbox, segm))
        bbox = [r for g in gathered for r in g[0]]
        segm = [r for g in gathered for r in g[1]]
    metrics: dict[str, float] = {}
    if not dist or torch.distributed.get_rank() == 0:
        gt = gt if gt is not None else load_coco_gt(dataset.ann_file)
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / "bbox.json", bbox)
            if masks:
                _write_json(out / "segm.json", segm)
        for kind, res in (("bbox", bbox), ("segm", segm)) if masks else (("bbox", bbox),):
            m = coco_evaluate(gt, res, kind)
            metrics.update({f"{kind}_{k}": v for k, v in m.items() if k != "summary"})
        metrics["detections"] = float(len(bbox))
    if dist:
        shared = [metrics]
        torch.distributed.broadcast_object_list(shared, src=0)
        metrics = shared[0]
    return metrics


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
