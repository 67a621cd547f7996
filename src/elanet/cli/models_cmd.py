"""``elanet models``: every registered model with parameters and GMACs at its native input size."""
from __future__ import annotations

import argparse

from ..models import create_model, list_models, model_info
from ..profile import profile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", default="", help="only names containing this text (e.g. resnet56)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: 10 CIFAR, 1000 ImageNet)")
    p.add_argument("--detectors", action="store_true",
                   help="Faster / Mask R-CNN on every ImageNet backbone (COCO: 80 classes + background) instead")


def _detectors(args: argparse.Namespace) -> int:
    from ..detect.detectors import DETECTORS, backbone_names, detector_params

    names = [n for n in backbone_names() if args.filter in n]
    if not names:
        raise ValueError(f"no ImageNet backbone name contains {args.filter!r}: run `elanet models --detectors` for the list")
    classes = 81 if args.num_classes is None else args.num_classes
    print(f"{'detector':<12} {'backbone':<20} {'params (M)':>11} {'trainable (M)':>14} {'vs plain (M)':>13}")
    print("  trainable: stem and layer1 frozen, as with a pretrained backbone; MMDetection (Table 3) counts these")
    for kind in DETECTORS:
        plain: dict[str, int] = {}
        for name in names:
            n = detector_params(kind, name, num_classes=classes)
            base = name.split("_")[0]
            if name == base:
                plain[base] = n["trainable"]
            delta = f"{(n['trainable'] - plain[base]) / 1e6:+13.3f}" if base in plain and name != base else f"{'':>13}"
            print(f"{kind:<12} {name:<20} {n['total'] / 1e6:>11.3f} {n['trainable'] / 1e6:>14.3f} {delta}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.detectors:
        return _detectors(args)
    names = [n for n in list_models() if args.filter in n]
    if not names:
        raise ValueError(f"no model name contains {args.filter!r}: run `elanet models` for the list")
    print(f"{'model':<20} {'input':>11} {'classes':>7} {'params (M)':>11} {'GMACs':>8}")
    for name in names:
        info = model_info(name)
        prof = profile(create_model(name, num_classes=args.num_classes), info["input_size"])
        classes = args.num_classes if args.num_classes is not None else info["num_classes"]
        size = "x".join(map(str, info["input_size"][1:]))
        print(f"{name:<20} {size:>11} {classes:>7} {prof.mparams:>11.3f} {prof.gmacs:>8.3f}", flush=True)
    return 0
