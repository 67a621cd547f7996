"""``elanet eval CHECKPOINT``: top-1 / top-5 of a checkpoint with its pruned structure restored, or of a
model written by ``elanet export`` (.pt2 / .onnx)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data import DATASETS, build_data
from ..export import FORMATS, load_exported
from ..pruning import ela_blocks, get_mask
from ..training.checkpoint import load_checkpoint, model_from_checkpoint
from ..training.distributed import resolve_device
from ..training.trainer import evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt file, a run folder (its best.pt), or a .pt2 / .onnx file from `elanet export`")
    p.add_argument("--dataset", choices=DATASETS, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if Path(args.checkpoint).suffix in FORMATS:
        return _run_exported(args)
    ckpt = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    cfg = ckpt["config"]
    dataset = args.dataset or cfg["dataset"]
    same = dataset == cfg["dataset"]
    data_dir = args.data_dir or (cfg.get("data_dir") if same else None)
    folder = dataset in ("imagenet", "folder")
    if not same and dataset != "digits" and not args.data_dir:
        raise ValueError(f"the checkpoint was trained on {cfg['dataset']}: pass --data-dir for {dataset}")
    image_size = ckpt.get("image_size", cfg.get("image_size")) if folder and ckpt.get("dataset", cfg["dataset"]) in ("imagenet", "folder") else None
    data = build_data(dataset, data_dir=data_dir, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                      device=device, workers=cfg.get("workers", 4), image_size=image_size)
    if data.num_classes != ckpt["num_classes"] or data.in_chans != ckpt["in_chans"]:
        raise ValueError(f"{dataset} has {data.num_classes} classes / {data.in_chans} channels but the checkpoint expects "
                         f"{ckpt['num_classes']} / {ckpt['in_chans']}: evaluate on the dataset it was trained on "
                         f"({cfg['dataset']}, the default when --dataset is left out)")
    model = model_from_checkpoint(ckpt, device=device)
    res = evaluate(model, data.test, amp=args.amp)
    mask = get_mask(model) if ela_blocks(model) else []
    res.update(model=ckpt["model_name"], dataset=dataset, epoch=ckpt.get("epoch"), active=sum(mask), ela_blocks=len(mask))
    return _report(res, mask, f"{ckpt['model_name']} (epoch {ckpt.get('epoch')})", as_json=args.json)


def _run_exported(args: argparse.Namespace) -> int:
    """Evaluate a .pt2 / .onnx file; its metadata names the dataset and the classifier size."""
    device = resolve_device(args.device)
    model, meta = load_exported(args.checkpoint, device=device)
    if "dataset" not in meta and not args.dataset:
        raise ValueError(f"{args.checkpoint} carries no dataset name: pass --dataset (and --data-dir)")
    dataset = args.dataset or meta["dataset"]
    data = build_data(dataset, data_dir=args.data_dir or meta.get("data_dir"), batch_size=args.batch_size,
                      eval_batch_size=args.batch_size, device=device, workers=4, image_size=meta.get("image_size"))
    if data.num_classes != meta.get("num_classes", data.num_classes) or data.image_size != meta.get("image_size", data.image_size):
        raise ValueError(f"{dataset} has {data.num_classes} classes at {data.image_size}px but the exported model expects "
                         f"{meta.get('num_classes')} at {meta.get('image_size')}px: evaluate on the dataset it was trained on")
    res = evaluate(model, data.test)
    mask = meta.get("mask") or []
    res.update(model=meta.get("model_name"), dataset=dataset, epoch=meta.get("epoch"), active=sum(mask), ela_blocks=len(mask),
               exported=str(args.checkpoint), params=meta.get("params"))
    return _report(res, mask, f"{meta.get('model_name')} exported ({Path(args.checkpoint).name})", as_json=args.json)


def _report(res: dict, mask: list[bool], what: str, *, as_json: bool) -> int:
    """Print an evaluation as JSON or as one line: accuracy, loss, images and the active ELA blocks."""
    if as_json:
        print(json.dumps(res))
    else:
        act = f" | ELA blocks active {sum(mask)}/{len(mask)}" if mask else ""
        print(f"{what} on {res['dataset']}: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% "
              f"loss {res['loss']:.4f} over {res['n']} images{act}")
    return 0
