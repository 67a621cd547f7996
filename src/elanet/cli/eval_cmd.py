"""``elanet eval CHECKPOINT``: top-1 / top-5 of a checkpoint with its pruned structure restored."""
from __future__ import annotations

import argparse
import json

from ..data import DATASETS, build_data
from ..pruning import ela_blocks, get_mask
from ..training.checkpoint import load_checkpoint, model_from_checkpoint
from ..training.distributed import resolve_device
from ..training.trainer import evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt file or a run folder (its best.pt)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
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
    if args.json:
        print(json.dumps(res))
    else:
        act = f" | ELA blocks active {sum(mask)}/{len(mask)}" if mask else ""
        print(f"{ckpt['model_name']} (epoch {ckpt.get('epoch')}) on {dataset}: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% "
              f"loss {res['loss']:.4f} over {res['n']} images{act}")
    return 0
