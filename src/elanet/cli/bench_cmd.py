"""``elanet bench``: placeholder until its issue lands."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("elanet bench is not implemented yet")
