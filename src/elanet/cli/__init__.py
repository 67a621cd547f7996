"""The ``elanet`` command: one sub-command per module of this package, dispatched here."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..runtime import keep_freed_memory

__all__ = ["main", "UsageError"]

# sub-command -> module under elanet.cli that defines add_arguments(parser) and run(args) -> int
COMMANDS = {
    "train": "Train a model with staged ELA pruning (default: ELA ResNet on the bundled digits)",
    "eval": "Evaluate a checkpoint (top-1 / top-5) with its pruned structure restored",
    "models": "List every registered model with its parameters and GMACs",
    "viz": "Draw attention maps, pruning charts, Score-CAM maps and speed plots",
    "detect": "Object detection: train / evaluate / draw Faster and Mask R-CNN with ELA backbones on COCO-format data",
    "bench": "Benchmark the training step of plain, MRLA-L, MRLA-B and ELA models",
    "study": "Run a grid of training runs over settings and seeds (the paper's ablations): mean ± std, mask stability",
    "export": "Export a checkpoint without its pruned attention, as a torch.export program (.pt2) or ONNX",
}


class UsageError(Exception):
    """A user-facing input error: printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elanet", description="Efficient Layer Attention (ELA) for CNNs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        modules[name] = importlib.import_module(f"elanet.cli.{name}_cmd")
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    keep_freed_memory()  # every step reuses its large blocks instead of page-faulting them in again
    try:
        return int(modules[args.command].run(args) or 0)
    except (UsageError, ValueError, OSError) as e:  # OSError: missing files, full disk, permissions
        msg = str(e)
        if isinstance(e, OSError) and e.errno and e.strerror:  # "[Errno 28] ..." -> the message itself
            msg = e.strerror + (f": {e.filename}" if e.filename else "")
        print(f"elanet {args.command}: error: {msg}", file=sys.stderr)
        return 2
