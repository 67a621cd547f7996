"""``elanet export RUN_OR_CHECKPOINT --out FILE``: the trained model without its pruned attention.

Example::

    elanet export runs/ela56 --out ela56.pt2      # torch.export program, loads with torch alone
    elanet export runs/ela56/best.pt --out ela56.onnx
"""
from __future__ import annotations

import argparse

from ..export import FORMATS, export_model
from ..models import model_info
from ..training.checkpoint import load_checkpoint, model_from_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt checkpoint or a run folder (its best.pt)")
    p.add_argument("--out", required=True, help=f"output file, ending in {' or '.join(FORMATS)}")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side the graph is traced for (default: the checkpoint's training size)")


def run(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt)
    side = args.image_size or ckpt.get("image_size") or model_info(ckpt["model_name"])["input_size"][-1]
    if side < 1:
        raise ValueError(f"--image-size must be >= 1, got {side}")
    cfg = ckpt.get("config", {})
    meta = {
        "model_name": ckpt["model_name"], "num_classes": ckpt["num_classes"], "in_chans": ckpt["in_chans"],
        "image_size": side, "dataset": ckpt.get("dataset"), "data_dir": cfg.get("data_dir"),
        "mean": ckpt.get("mean"), "std": ckpt.get("std"), "classes": ckpt.get("classes"), "epoch": ckpt.get("epoch"),
        "mask": ckpt.get("mask", []),
    }
    report = export_model(model, args.out, input_size=(ckpt["in_chans"], side, side), metadata=meta)
    print(f"{ckpt['model_name']} (epoch {ckpt.get('epoch')}): {report.summary()}")
    return 0
