"""``elanet train``: staged ELA training; with no arguments, an ELA ResNet-20 on the bundled digits."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from ..training.config import PRESETS, TrainConfig, load_run_config, resolve_config
from ..training.layout import MEMORY_FORMATS
from . import UsageError

RUNTIME = ("device", "workers", "threads", "epochs", "plots", "tensorboard", "memory_format", "compile")  # what --resume may change


def _windows(text: str) -> list[list[int]]:
    """'1-3,45-48' -> [[1, 3], [45, 48]]; '' or 'none' -> [] (no pruning)."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        out = []
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out.append([int(a), int(b or a)])
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"windows must look like 1-3,45-48 (1-based epochs), got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 100,150, got {text!r}") from None


def _counts(text: str) -> int | list[int]:
    """'2' -> 2 (every round); '2,1,0' -> [2, 1, 0] (one count per window)."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 2, or one per window like 2,1,0, got {text!r}") from None
    return counts[0] if len(counts) == 1 else counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help="model name (see `elanet models`), default: the preset's (digits: resnet20_ela)")
    g.add_argument("--dataset", help="digits (default, bundled), cifar10, cifar100, imagenet or folder")
    g.add_argument("--data-dir", help="dataset folder (CIFAR: torchvision's layout; imagenet/folder: train/ and val/)")
    g.add_argument("--download", action="store_const", const=True, help="download CIFAR into --data-dir (needs internet)")
    g.add_argument("--image-size", type=int, help="crop size for imagenet/folder (default 224)")
    g.add_argument("--pretrained", metavar="SOURCE",
                   help="start from pretrained backbone weights: a file, or torchvision:NAME / timm:NAME from the local cache "
                        "(e.g. timm:resnet50c for the deep-stem MRLA-B/ELA ResNet-50); attention starts near zero")
    g.add_argument("--preset", choices=sorted(PRESETS), help="paper recipe (default: the dataset's)")
    g.add_argument("--config", help="YAML file of settings; command-line flags override it")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", help="run folder (default: a new folder under runs/)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--milestones", type=_ints, help="epochs after which lr is multiplied by --lr-decay, e.g. 100,150")
    g.add_argument("--lr-decay", type=float)
    g.add_argument("--schedule", choices=["step", "cosine"], help="step: x --lr-decay after each milestone; cosine: to 0 over the run")
    g.add_argument("--drop-path", type=float, help="DropPath rate on the attention branch (paper: 0.2)")
    g.add_argument("--label-smoothing", type=float)
    g = p.add_argument_group("ELA pruning (SPEC §3)")
    g.add_argument("--windows", type=_windows, help="measurement windows, e.g. 1-3,45-48,91-93; 'none' disables pruning")
    g.add_argument("--gamma", type=float, help="EBQM quantile of candidate scores (0, 1]")
    g.add_argument("--alpha", type=float, help="Beta CDF alpha > 0")
    g.add_argument("--beta", type=float, help="Beta CDF beta > 0")
    g.add_argument("--tau", type=float, help="prune when the mapped value is below tau, in [0, 1]")
    g.add_argument("--strategy", choices=["quantile", "threshold", "fixed"])
    g.add_argument("--mapping", help="quantile mapping: beta (EBQM), gamma, normal, softmax, sigmoid, gqm, eqm")
    g.add_argument("--threshold", type=float, help="raw KL threshold for --strategy threshold")
    g.add_argument("--fixed-count", type=_counts, help="blocks pruned per round for --strategy fixed, or one per window: 2,1,0")
    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision (GPU runs)")
    g.add_argument("--memory-format", choices=MEMORY_FORMATS,
                   help="tensor layout: auto (default: the device's faster one, channels_last on CPU and CUDA), channels_last or contiguous")
    g.add_argument("--channels-last", dest="memory_format", action="store_const", const="channels_last",
                   help="the same as --memory-format channels_last (kept for older commands)")
    g.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the training step (inductor); recompiles once after every pruning round")
    g.add_argument("--workers", type=int, help="DataLoader workers for imagenet/folder")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--no-plots", dest="plots", action="store_const", const=False, help="do not draw figures into the run folder")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False)


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig, resolve: Callable[..., Any] = resolve_config) -> Any:
    """The run's config from the flags: the saved one on ``--resume`` (only RUNTIME flags may change), else preset <- YAML <- flags.

    Args:
        cls: the task's config class (``TrainConfig``, ``DetectConfig``).
        resolve: its ``resolve_config``-style builder.
    """
    fields = cls.__dataclass_fields__
    flags = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume:
        ignored = sorted(set(flags) - set(RUNTIME))
        if ignored or args.config or args.preset:
            raise UsageError(f"--resume continues the run with its saved config; drop {', '.join(ignored or ['--config/--preset'])} (only {', '.join(RUNTIME)} may change)")
        return load_run_config(cls, args.resume, flags)
    return resolve(preset=args.preset, config_file=args.config, overrides=flags)


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume)
    return 128 + (summary.get("signal") or 2) if summary.get("interrupted") else 0
