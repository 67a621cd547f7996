"""``elanet bench``: time the training step of plain, MRLA-L, MRLA-B, ELA, DIA or any registered variant.

Example::

    elanet bench --depths 110 --variants plain dia ela --fractions 0 0.5   # ELA vs DIA
    elanet bench --depths 50 --variants plain torchvision --batch-size 16  # our plain ResNet-50 vs torchvision's

    elanet bench --depths 56 110 --out bench.json          # CIFAR input, CPU, 2 threads, batch 64
    elanet bench --depths 50 --batch-size 16 --steps 5     # ImageNet ResNet-50 at 224x224
    elanet bench --depths 56 --run runs/ela56              # adds the final mask of a training run
    elanet bench --mode infer --depths 56 110              # eval forward: plain, MRLA-B, exported ELA 0/50/100 %
    elanet bench --mode infer --runtime onnxruntime        # the same, every variant as an ONNX file in onnxruntime
    elanet bench --depths 56 --compile                     # the same steps through torch.compile
"""
from __future__ import annotations

import argparse
import shlex
import sys

import torch

from ..bench import (DEFAULT_VARIANTS, FRACTIONS, INFER_BATCHES, INFER_FRACTIONS, LAYOUTS, RUNTIMES, format_infer_table,
                     format_table, make_infer_variants, make_variants, run_benchmark, run_infer_benchmark, save_json)
from ..training.layout import MEMORY_FORMATS
from .paths import check_output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--depths", type=int, nargs="+", default=[56, 110],
                   help="ResNet depths: 20/56/110 (CIFAR, 32x32) or 50/101 (ImageNet, 224x224)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"variants per depth: plain, mrla_l, mrla_b, ela (one per --fractions), dia, se, eca, cbam, bam, "
                        f"dla_l, gc, rla, or torchvision (torchvision.models.resnetN); default: {' '.join(DEFAULT_VARIANTS)}, "
                        f"each where the depth has it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--image-size", type=int, default=None, help="input side (default 32 on CIFAR, 224 on ImageNet)")
    p.add_argument("--drop-path", type=float, default=0.2, help="DropPath rate of the attention branch")
    p.add_argument("--mode", choices=["train", "infer"], default="train",
                   help="train: one training step; infer: eval-mode forward of plain, MRLA-B and exported ELA")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(INFER_BATCHES), help="--mode infer: batch sizes")
    p.add_argument("--runtime", choices=list(RUNTIMES), default="torch",
                   help="--mode infer: torch (eager, default) or onnxruntime (every variant exported to ONNX and run by "
                        "onnxruntime on the CPU, as it would be deployed)")
    p.add_argument("--compile", action="store_true", help="run every model through torch.compile (inductor)")
    p.add_argument("--fractions", type=float, nargs="+", default=None,
                   help=f"pruned fractions of the fixed, evenly spread ELA masks (default {' '.join(f'{f:g}' for f in FRACTIONS)}; "
                        f"--mode infer: {' '.join(f'{f:g}' for f in INFER_FRACTIONS)})")
    p.add_argument("--no-kl", action="store_true", help="leave out 'ELA 0%% +KL' (KL scores accumulated every step)")
    p.add_argument("--run", default=None,
                   help="training run folder: adds 'ELA run' with the final mask of its pruning.json")
    p.add_argument("--memory-format", default="both", choices=["both", *MEMORY_FORMATS],
                   help="layouts to time: both (default: NCHW and channels-last, the faster one marked), auto (the "
                        "device's default), channels_last or contiguous")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast of forward and loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="JSON file for the results")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--task", choices=["classify", "detect"], default="classify",
                   help="detect: a Mask / Faster R-CNN training step on the synthetic COCO-format set (plain, MRLA-L, "
                        "ELA at --fractions, default 0 0.5 1; --depths 50 or 101, default 50; --image-size default 128)")
    p.add_argument("--detector", choices=["mask_rcnn", "faster_rcnn"], default="mask_rcnn", help="with --task detect")


def _command(args: argparse.Namespace) -> str:
    """The full command line, every setting spelled out."""
    words = ["elanet", "bench", *(["--mode", "infer"] if args.mode == "infer" else []), "--depths", *map(str, args.depths)]
    if args.variants and args.mode == "train":
        words += ["--variants", *args.variants]
    words += ["--batch-sizes", *map(str, args.batch_sizes)] if args.mode == "infer" else ["--batch-size", str(args.batch_size)]
    words += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
              "--device", args.device, "--drop-path", f"{args.drop_path:g}", "--fractions", *(f"{f:g}" for f in args.fractions),
              "--memory-format", args.memory_format, "--amp", args.amp, "--seed", str(args.seed), "--out", args.out]
    if args.image_size:
        words += ["--image-size", str(args.image_size)]
    if args.no_kl:
        words.append("--no-kl")
    if args.run:
        words += ["--run", args.run]
    if args.compile:
        words.append("--compile")
    if args.mode == "infer" and args.runtime != "torch":
        words += ["--runtime", args.runtime]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.image_size is not None and args.image_size < 8:
        raise ValueError(f"--image-size must be >= 8 (or left out for the default), got {args.image_size}")
    check_output_file(args.out)  # before the benchmark runs, not after
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _detect(args: argparse.Namespace) -> int:
    from ..detect.bench import detect_variants, run_detect_benchmark

    depths = [50] if args.depths == [56, 110] else args.depths
    fractions = [0.0, 0.5, 1.0] if args.fractions is None else args.fractions
    size = args.image_size or 128
    variants = detect_variants(depths, fractions=fractions)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    report = run_detect_benchmark(variants, detector=args.detector, batch_size=args.batch_size, image_size=size,
                                  steps=args.steps, warmup=args.warmup, device=args.device, seed=args.seed, log=log)
    report["command"] = shlex.join(["elanet", "bench", "--task", "detect", "--detector", args.detector, "--depths",
                                    *map(str, depths), "--fractions", *(f"{f:g}" for f in fractions), "--batch-size",
                                    str(args.batch_size), "--image-size", str(size), "--steps", str(args.steps), "--warmup",
                                    str(args.warmup), "--threads", str(args.threads), "--device", args.device,
                                    "--seed", str(args.seed), "--out", args.out])
    print(format_table(report))
    print(f"saved {save_json(report, args.out)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.task == "detect":
        return _detect(args)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.mode == "infer":
        return _run_infer(args, log)
    args.fractions = list(FRACTIONS) if args.fractions is None else args.fractions
    variants = make_variants(args.depths, variants=args.variants, fractions=args.fractions, measure_kl=not args.no_kl, run_dir=args.run)
    if log:
        log(f"benchmarking {len(variants)} variants on {args.device} ({args.threads} threads), batch {args.batch_size}")
    report = run_benchmark(
        variants, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device=args.device,
        image_size=args.image_size, drop_path=args.drop_path, seed=args.seed, compile=args.compile, log=log,
        memory_formats=LAYOUTS if args.memory_format == "both" else (args.memory_format,), amp=args.amp,
    )
    report["command"] = _command(args)
    print(format_table(report))
    path = save_json(report, args.out)
    print(f"saved {path}")
    return 0


def _run_infer(args: argparse.Namespace, log) -> int:
    if args.run or args.no_kl:
        raise ValueError("--run and --no-kl belong to --mode train: drop them for --mode infer")
    args.fractions = list(INFER_FRACTIONS) if args.fractions is None else args.fractions
    variants = make_infer_variants(args.depths, fractions=args.fractions)
    if log:
        log(f"benchmarking the forward of {len(variants)} variants at batch {args.batch_sizes} on {args.device} ({args.threads} threads)")
    report = run_infer_benchmark(variants, batch_sizes=args.batch_sizes, steps=args.steps, warmup=args.warmup, device=args.device,
                                 image_size=args.image_size, seed=args.seed, compile=args.compile, log=log,
                                 memory_formats=LAYOUTS if args.memory_format == "both" else (args.memory_format,),
                                 runtime=args.runtime)
    report["command"] = _command(args)
    print(format_infer_table(report))
    print(f"saved {save_json(report, args.out)}")
    return 0
