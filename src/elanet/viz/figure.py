"""Figure plumbing shared by every chart: fixed-size Agg figures written atomically as PNG or SVG."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DPI", "FORMATS", "new_figure", "save_figure", "check_format"]

DPI = 120  # pixels per inch of every PNG: a figure of w x h inches is int(w * DPI) x int(h * DPI) pixels
FORMATS = ("png", "svg")


def check_format(fmt: str) -> str:
    """Return ``fmt`` or raise ``ValueError`` when it is not ``'png'`` or ``'svg'``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on the Agg canvas (no display, no pyplot state)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str, fmt: str = "png") -> Path:
    """Write ``fig`` to ``out_dir/name.fmt`` at its exact size (no tight cropping), atomically.

    A reader of the run folder never sees a half-written picture: the image goes to a temporary
    file in the same folder first, then is renamed over the old one.
    """
    check_format(fmt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.{fmt}"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=DPI, metadata={"Software": "elanet"} if fmt == "png" else None)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a picture is for everyone who can read the run
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
