"""Checks of output paths before a command spends time: one-line errors that name the fix."""
from __future__ import annotations

import os
from pathlib import Path

from ..training.run_dir import creatable

__all__ = ["check_output_file"]


def check_output_file(path: str | os.PathLike, *, flag: str = "--out") -> Path:
    """Raise ``ValueError`` unless ``path`` can be written as a file (its folder may not exist yet)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder: give a file name, e.g. {p / 'bench.json'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {p} is not writable: choose another {flag}")
    problem = creatable(p.parent)
    if problem:
        raise ValueError(f"{flag} {p}: {problem}; choose another {flag}")
    return p
