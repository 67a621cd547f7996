"""``elanet models``: every registered model with parameters and GMACs at its native input size."""
from __future__ import annotations

import argparse

from ..models import create_model, list_models, model_info
from ..profile import profile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", default="", help="only names containing this text (e.g. resnet56)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: 10 CIFAR, 1000 ImageNet)")


def run(args: argparse.Namespace) -> int:
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
