"""``elanet detect train | eval | predict``: Faster / Mask R-CNN with ELA backbones on COCO-format data.

With no arguments, ``elanet detect train`` trains a Mask R-CNN with an ELA ResNet-18 on the embedded
synthetic set (generated into the cache folder in COCO format on first use).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import UsageError
from .train_cmd import _ints, _windows, config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="detect_command", metavar="ACTION")
    t = sub.add_parser("train", help="train a detector (default: Mask R-CNN, ELA ResNet-18, synthetic digits)",
                       description="Train a detector with staged ELA pruning. Presets: synthetic (default), coco (with --data-dir).")
    _train_arguments(t)
    e = sub.add_parser("eval", help="COCO evaluation of a checkpoint; writes bbox.json / segm.json",
                       description="Evaluate a detection checkpoint with pycocotools and write COCO results files.")
    e.add_argument("checkpoint", help="a .pt file or a run folder (its best.pt)")
    e.add_argument("--data-dir", help="COCO 2017-layout folder (default: the checkpoint's; the synthetic set if it had none)")
    e.add_argument("--split", default=None, help="split to evaluate (default: the run's val_split, e.g. val2017)")
    e.add_argument("--out", help="folder for bbox.json / segm.json (default: eval/ beside the checkpoint)")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--device", default="auto")
    e.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    e.add_argument("--json", action="store_true", help="print the APs as JSON")
    d = sub.add_parser("predict", help="draw a checkpoint's predictions on images",
                       description="Draw boxes, labels, scores (and masks) predicted by a detection checkpoint.")
    d.add_argument("checkpoint", help="a .pt file or a run folder (its best.pt)")
    d.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    d.add_argument("--out", required=True, help="folder for the drawn images")
    d.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    d.add_argument("--device", default="auto")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--detector", choices=["faster_rcnn", "mask_rcnn"])
    g.add_argument("--model", help="backbone: a registered ImageNet model (default resnet18_ela on the synthetic set, resnet50_ela with the coco preset); `elanet models --detectors`")
    g.add_argument("--data-dir", help="COCO 2017 layout: annotations/instances_train2017.json, train2017/, val2017/ "
                                      "(default: the synthetic set)")
    g.add_argument("--train-split", help="default train2017")
    g.add_argument("--val-split", help="default val2017")
    g.add_argument("--preset", choices=["synthetic", "coco"], help="default: coco with --data-dir, else synthetic")
    g.add_argument("--config", help="YAML file of settings (e.g. configs/coco/mask_rcnn_r50_ela.yaml); flags override it")
    g.add_argument("--pretrained", help="an elanet classification checkpoint (file or run folder) for the backbone")
    g.add_argument("--keep-mask", action="store_const", const=True, help="keep the pretrained checkpoint's ELA mask "
                                                                          "(default: every block starts active)")
    g.add_argument("--frozen-stages", type=int, help="stages frozen with the stem (default 1 with --pretrained, else -1)")
    g.add_argument("--norm", choices=["bn", "gn"], help="BatchNorm (default) or GroupNorm in backbone and FPN")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", help="run folder (default: a new folder under runs/)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="images per process")
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-iters", type=int, help="linear warm-up steps (MMDetection: 500)")
    g.add_argument("--milestones", type=_ints, help="epochs after which lr is multiplied by --lr-decay, e.g. 8,11")
    g.add_argument("--lr-decay", type=float)
    g.add_argument("--schedule", choices=["step", "cosine"], help="step: x --lr-decay after each milestone; cosine: to 0 over the run")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0: off)")
    g.add_argument("--min-size", type=int, help="shorter image side after resizing (ratio kept)")
    g.add_argument("--max-size", type=int, help="longest image side after resizing")
    g.add_argument("--flip", dest="flip", action="store_const", const=True, help="random horizontal flip (coco preset: on)")
    g.add_argument("--no-flip", dest="flip", action="store_const", const=False, help="no flip (synthetic preset: digits are not mirror images)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], help="sgd (default: momentum, weight decay) or adamw")
    g.add_argument("--drop-path", type=float, help="DropPath rate on the attention branch")
    g = p.add_argument_group("heads (default torchvision's = Table 3's: 256, 1024, 256, 4; synthetic preset: 128, 512, 64, 2)")
    g.add_argument("--fpn-channels", type=int, help="FPN / RPN / RoI feature channels")
    g.add_argument("--box-head-dim", type=int, help="width of the box head's two fully connected layers")
    g.add_argument("--mask-head-channels", type=int, help="width of the mask head's convs")
    g.add_argument("--mask-head-convs", type=int, help="number of 3x3 convs in the mask head")
    g.add_argument("--anchor-sizes", type=_ints, help="RPN anchor size per FPN level P2-P6 (default 32,64,128,256,512)")
    g.add_argument("--roi-canonical-scale", type=int, help="box size whose RoI features come from P4 (FPN eq. 1; default 224)")
    g = p.add_argument_group("ELA pruning (SPEC §3; coco preset: windows 1,7, alpha 2, beta 5, tau 0.2)")
    g.add_argument("--windows", type=_windows, help="measurement windows, e.g. 1,7; 'none' disables pruning")
    g.add_argument("--gamma", type=float)
    g.add_argument("--alpha", type=float)
    g.add_argument("--beta", type=float)
    g.add_argument("--tau", type=float)
    g.add_argument("--strategy", choices=["quantile", "threshold", "fixed"])
    g.add_argument("--mapping")
    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"])
    g.add_argument("--channels-last", action="store_const", const=True)
    g.add_argument("--workers", type=int, help="DataLoader workers")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--predictions", type=int, help="validation images drawn into predictions/ (default 8)")
    g.add_argument("--no-plots", dest="plots", action="store_const", const=False)
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False)


def run(args: argparse.Namespace) -> int:
    if args.detect_command is None:
        raise UsageError("say what to do: elanet detect train | eval | predict (see elanet detect --help)")
    return {"train": _train, "eval": _eval, "predict": _predict}[args.detect_command](args)


def _train(args: argparse.Namespace) -> int:
    from ..detect.config import DetectConfig, resolve_detect_config
    from ..detect.task import train_detector

    cfg = config_from_args(args, DetectConfig, resolve_detect_config)
    summary = train_detector(cfg, resume=args.resume)
    return 128 + (summary.get("signal") or 2) if summary.get("interrupted") else 0


def _data_for(ckpt: dict, data_dir: str | None, split: str | None, masks: bool):
    from ..detect.coco import CocoDetection, coco_paths
    from ..detect.synthetic import make_synthetic_coco

    cfg = ckpt["config"]
    root = data_dir or cfg.get("data_dir") or make_synthetic_coco(seed=0)
    ds = CocoDetection(*coco_paths(root, split or cfg.get("val_split", "val2017")), masks=masks)
    if ds.category_ids != ckpt["category_ids"]:
        raise ValueError(f"{ds.ann_file} has categories {ds.category_ids[:5]}... but the checkpoint was trained on "
                         f"{ckpt['category_ids'][:5]}...: evaluate on the dataset it was trained on")
    return ds


def _eval(args: argparse.Namespace) -> int:
    from ..detect.coco import DetectionLoader
    from ..detect.evaluate import STATS, evaluate_detector
    from ..detect.task import detector_from_checkpoint
    from ..pruning import get_mask
    from ..training.checkpoint import load_checkpoint, resolve_checkpoint
    from ..training.distributed import resolve_device

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    path = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    model = detector_from_checkpoint(ckpt, device=resolve_device(args.device))
    masks = ckpt["detector"] == "mask_rcnn"
    ds = _data_for(ckpt, args.data_dir, args.split, masks)
    out = Path(args.out) if args.out else path.parent / "eval"
    m = evaluate_detector(model, DetectionLoader(ds, args.batch_size, train=False), masks=masks, amp=args.amp, out_dir=out)
    mask = get_mask(model)
    res = {"detector": ckpt["detector"], "backbone": ckpt["model_name"], "epoch": ckpt["epoch"], "images": len(ds),
           **{k: v for k, v in m.items()}, "active_blocks": sum(mask), "ela_blocks": len(mask), "results": str(out)}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{ckpt['detector']} / {ckpt['model_name']} (epoch {ckpt['epoch']}) on {ds.ann_file} ({len(ds)} images)"
          + (f" | ELA blocks active {sum(mask)}/{len(mask)}" if mask else ""))
    print(f"{'':6}" + "".join(f"{s:>8}" for s in STATS))
    for kind in ("bbox", "segm") if masks else ("bbox",):
        print(f"{kind:<6}" + "".join(f"{m[f'{kind}_{s}']:>8.1f}" for s in STATS))
    print(f"results written to {out}/ (bbox.json{', segm.json' if masks else ''}); -1: no ground truth of that size")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..detect.draw import draw_prediction, save_image
    from ..detect.evaluate import predict
    from ..detect.task import detector_from_checkpoint
    from ..training.checkpoint import load_checkpoint
    from ..training.distributed import resolve_device

    images = []
    for f in args.images:  # check every input before writing anything
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"image {p} does not exist: pass image files")
        try:
            with Image.open(p) as im:
                images.append((p, torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float().div_(255)))
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{p} is not a readable image: pass PNG or JPEG files") from None
    ckpt = load_checkpoint(args.checkpoint)
    model = detector_from_checkpoint(ckpt, device=resolve_device(args.device))
    out = Path(args.out)
    for p, img in images:
        pred = predict(model, [img])[0]
        dst = save_image(draw_prediction(img, pred, ckpt["classes"], score_threshold=args.score_threshold), out / f"{p.stem}.png")
        n = int((pred["scores"] >= args.score_threshold).sum())
        print(f"{p} -> {dst}: {n} detection(s) >= {args.score_threshold}")
    return 0
