"""``elanet study STUDY.yaml [train flags] --out DIR``: a grid of training runs, resumable, with mean ± std tables."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..training.config import TrainConfig
from . import train_cmd


STUDY_OWN = ("--out", "--resume", "--threads", "--seed")  # train flags that mean something else for a study (seeds: the file)


class _TrainFlags:
    """Passes ``train_cmd.add_arguments`` through to a parser, leaving out the flags a study defines itself."""

    def __init__(self, target) -> None:
        self._target = target

    def add_argument_group(self, *args, **kwargs) -> "_TrainFlags":
        return _TrainFlags(self._target.add_argument_group(*args, **kwargs))

    def add_argument(self, *names, **kwargs):
        if names[0] not in STUDY_OWN:
            return self._target.add_argument(*names, **kwargs)
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", metavar="STUDY.yaml", help="study file: axes, seeds, settings (see studies/)")
    g = p.add_argument_group("study")
    g.add_argument("--out", help="study folder (default: runs/study-NAME-DATASET); run the same command again to continue")
    g.add_argument("--jobs", type=int, default=1, help="cells run at once; CPU threads are split between them (default 1)")
    g.add_argument("--threads", type=int, help="CPU threads shared by all jobs (default: every core)")
    train_cmd.add_arguments(_TrainFlags(p))  # every other train flag applies to every cell


def run(args: argparse.Namespace) -> int:
    from ..study import load_study, run_study

    fields = TrainConfig.__dataclass_fields__
    flags = {k: v for k, v in vars(args).items() if k in fields and k not in ("out", "threads") and v is not None}
    study = load_study(args.study, flags=flags, preset=args.preset, config_file=args.config)
    out = Path(args.out or f"runs/study-{study.name}-{study.dataset}")
    return run_study(study, out, jobs=args.jobs, threads=args.threads, plots=args.plots is not False)
