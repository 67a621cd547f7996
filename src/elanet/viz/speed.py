"""Training time against depth for each variant (paper Figure 4), from a benchmark JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from .figure import check_format, new_figure, save_figure

__all__ = ["REQUIRED", "read_bench", "check_records", "speed_figsize", "plot_speed", "draw_speed"]

REQUIRED = ("model", "depth", "variant", "median_step_s")
PANEL_KEYS = ("dataset", "device")  # records differing in these go to separate panels


def read_bench(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a benchmark JSON: a list, or an object holding it under ``records`` / ``results``.

    Each record needs ``model``, ``depth`` (int), ``variant`` (label) and ``median_step_s`` (median
    seconds per training step); an optional ``epoch_s`` (seconds per epoch) is plotted instead when
    every record has it.

    Raises:
        FileNotFoundError: no file.
        ValueError: not JSON, or a record lacks a key.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"benchmark file {p} does not exist: pass the JSON written by `elanet bench`")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not JSON ({e}): pass the JSON written by `elanet bench`") from None
    records = data.get("records", data.get("results")) if isinstance(data, dict) else data
    if isinstance(records, list) and any(isinstance(r, dict) and "best_layout" in r for r in records):
        records = [r for r in records if r.get("best_layout", True)]  # each variant in its faster memory layout
    return check_records(records, source=str(p))


def check_records(records: Any, *, source: str = "benchmark") -> list[dict[str, Any]]:
    """Copies of the records with ``depth`` as int and ``median_step_s`` as float, or ``ValueError``."""
    records = list(records) if isinstance(records, (list, tuple)) else records
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source} holds no benchmark records: expected a list of records with keys {', '.join(REQUIRED)}")
    for i, r in enumerate(records):
        missing = [k for k in REQUIRED if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{source}: record {i} lacks {', '.join(missing)} (each record needs {', '.join(REQUIRED)})")
        records[i] = r = dict(r)
        try:
            r["depth"], r["median_step_s"] = int(r["depth"]), float(r["median_step_s"])
        except (TypeError, ValueError):
            raise ValueError(f"{source}: record {i} has depth {r['depth']!r} and median_step_s {r['median_step_s']!r}: "
                             "need an integer and a number of seconds") from None
    return records


def _panels(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        key = ", ".join(str(r[k]) for k in PANEL_KEYS if r.get(k) is not None)
        out.setdefault(key, []).append(r)
    return out


def speed_figsize(panels: int) -> tuple[float, float]:
    """Figure size in inches for ``panels`` side-by-side plots."""
    return 5.4 * panels + 0.4, 4.4


def _canon(label: str) -> str:
    return "".join(ch for ch in str(label).lower() if ch.isalnum())


def _draw_panel(ax, records: list[dict[str, Any]], key: str, per_epoch: bool) -> bool:
    series: dict[str, dict[int, list[float]]] = {}
    for r in records:
        t = float(r["epoch_s"]) if per_epoch else 1000.0 * r["median_step_s"]
        series.setdefault(str(r["variant"]), {}).setdefault(r["depth"], []).append(t)
    means = {v: {d: float(np.mean(ts)) for d, ts in sorted(pts.items())} for v, pts in series.items()}
    for v, pts in means.items():
        ax.plot(list(pts), list(pts.values()), marker="o", label=v)
    ref = next((v for v in means if _canon(v) in ("mrlab", "mrlabase")), None)
    ela = next((v for v in means if _canon(v) == "ela"), None)
    if ref and ela:  # the paper's headline: ELA's saving against MRLA-B at each depth
        for d, t in means[ela].items():
            if d in means[ref] and means[ref][d] > 0:
                ax.annotate(f"{100 * (t / means[ref][d] - 1):+.0f}%", (d, t), textcoords="offset points",
                            xytext=(5, -12), ha="left", fontsize=8)
    depths = sorted({r["depth"] for r in records})
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("time per epoch (s)" if per_epoch else "median training-step time (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="variant", title_fontsize=8)
    if key:
        ax.set_title(key, fontsize=10)
    return bool(ref and ela)


def plot_speed(records: Sequence[dict[str, Any]], *, title: str | None = None) -> Figure:
    """Time against depth, one line per variant, one panel per dataset / device."""
    per_epoch = all(isinstance(r.get("epoch_s"), (int, float)) for r in records)
    panels = _panels(records)
    fig = new_figure(*speed_figsize(len(panels)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    labelled = [_draw_panel(ax, rs, key, per_epoch) for ax, (key, rs) in zip(axes, panels.items())]
    what = "per epoch" if per_epoch else "per training step"
    fig.suptitle(title or f"Training time {what} against depth" + (" (%: ELA against MRLA-B)" if any(labelled) else ""),
                 fontsize=11)
    return fig


def draw_speed(records: Sequence[dict[str, Any]], out_dir: str | os.PathLike, *, fmt: str = "png",
               title: str | None = None) -> Path:
    """Draw the benchmark ``records`` (see :func:`read_bench`) to ``out_dir/speed.<fmt>``."""
    check_format(fmt)
    records = check_records(list(records))
    return save_figure(plot_speed(records, title=title), out_dir, "speed", fmt)
