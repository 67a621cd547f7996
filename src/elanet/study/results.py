"""Study results: one row per run (``study.csv``), one row per setting (``study.md``), mask stability.

Mask stability is the paper's robustness claim made measurable: for the runs of one setting (its
seeds), the mean pairwise Jaccard similarity |A ∩ B| / |A ∪ B| of their pruned-block sets (1 = every
seed pruned the same blocks; two empty sets count as identical), and how often each block was pruned.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .spec import Study

__all__ = ["read_run", "jaccard", "mask_stability", "run_rows", "setting_rows", "study_markdown", "write_results",
           "read_study_csv", "RUN_COLUMNS", "TIMING_COLUMNS"]

RUN_COLUMNS = ["cell", "seed", "status", "best_top1", "final_top1", "epochs", "sec_per_epoch", "train_s",
               "active_blocks", "attention_blocks", "pruned_blocks", "pruned", "mask", "run_dir"]
TIMING_COLUMNS = ("sec_per_epoch", "train_s")


def read_run(run: str | os.PathLike) -> dict[str, Any]:
    """A run folder's summary, metrics rows and pruning rounds (empty where not written yet)."""
    run = Path(run)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    metrics = list(csv.DictReader(open(run / "metrics.csv"))) if (run / "metrics.csv").is_file() else []
    rounds = json.loads((run / "pruning.json").read_text())["rounds"] if (run / "pruning.json").is_file() else []
    return {"summary": summary, "metrics": metrics, "rounds": rounds}


def jaccard(a: set[int], b: set[int]) -> float:
    """|a ∩ b| / |a ∪ b|; 1.0 when both are empty (the same, empty, choice)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def mask_stability(masks: Sequence[Sequence[bool]]) -> tuple[float, np.ndarray]:
    """Mean pairwise Jaccard similarity of the pruned sets of ``masks`` and each block's pruning frequency.

    Returns ``(nan, frequencies)`` with fewer than two masks (no pair to compare).
    """
    if not masks:
        return math.nan, np.zeros(0)
    pruned = [{i for i, on in enumerate(m) if not on} for m in masks]
    pairs = [jaccard(a, b) for a, b in itertools.combinations(pruned, 2)]
    n = max(len(m) for m in masks)
    freq = np.array([sum(i in p for p in pruned) / len(pruned) for i in range(n)])
    return (float(np.mean(pairs)) if pairs else math.nan), freq


def run_rows(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per cell: its axis values, seed and outcome (status ``done``, ``incomplete`` or ``pending``)."""
    rows = []
    for cell in study.cells:
        run = out / "runs" / cell.name
        r = read_run(run)
        s, metrics = r["summary"], r["metrics"]
        row: dict[str, Any] = {"cell": cell.name, **cell.labels, "seed": cell.seed, "run_dir": f"runs/{cell.name}"}
        if s is None or s.get("interrupted"):
            row["status"] = "incomplete" if metrics else "pending"
        else:
            mask = [bool(m) for m in s.get("mask") or []]
            epoch_s = [float(m["epoch_s"]) for m in metrics]
            row.update(status="done", best_top1=s["best_top1"], final_top1=float(metrics[-1]["test_top1"]) if metrics else "",
                       epochs=len(metrics), sec_per_epoch=float(np.mean(epoch_s)) if epoch_s else "",
                       train_s=float(np.sum(epoch_s)), active_blocks=s["active_blocks"],
                       attention_blocks=s["attention_blocks"],
                       pruned_blocks=sum(not m for m in mask) if mask else "",
                       pruned=" ".join(str(i) for i, m in enumerate(mask) if not m), mask="".join("1" if m else "0" for m in mask))
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def setting_rows(axes: Sequence[str], rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One row per setting (axis values without the seed) over its finished runs, in grid order.

    Args:
        axes: the study's axis names (columns of ``rows``).
        rows: the rows of ``study.csv`` as read back (strings).
    """
    settings: dict[tuple, list[dict]] = {}
    for row in rows:
        settings.setdefault(tuple(row[a] for a in axes), []).append(row)
    out, base = [], None
    for setting, runs in settings.items():
        finished = [r for r in runs if r["status"] == "done"]
        agg: dict[str, Any] = {"setting": dict(zip(axes, setting)), "runs": len(finished), "of": len(runs)}
        if finished:
            agg["best"] = _mean_std([float(r["best_top1"]) for r in finished])
            agg["final"] = _mean_std([float(r["final_top1"]) for r in finished])
            agg["sec_per_epoch"] = float(np.mean([float(r["sec_per_epoch"]) for r in finished]))
            agg["train_s"] = _mean_std([float(r["train_s"]) for r in finished])
            base = base or agg["sec_per_epoch"]
            agg["ratio"] = agg["sec_per_epoch"] / base
            masks = [[c == "1" for c in r["mask"]] for r in finished if r["mask"]]
            if masks:
                counts = [int(r["pruned_blocks"]) for r in finished if r["mask"]]
                agg["pruned"] = (float(np.mean(counts)), min(counts), max(counts))
                agg["jaccard"], agg["frequency"] = mask_stability(masks)
        out.append(agg)
    return out


def _pm(ms: tuple[float, float] | None) -> str:
    if ms is None:
        return "–"
    return f"{ms[0]:.2f} ± {ms[1]:.2f}" if math.isfinite(ms[1]) else f"{ms[0]:.2f}"


def study_markdown(study: Study, settings: list[dict[str, Any]]) -> str:
    """``study.md``: the per-setting table and the per-block pruning frequencies."""
    axes = study.axes or ["setting"]
    head = [*axes, "runs", "best top-1 (%)", "final top-1 (%)", "s / epoch", "ratio", "pruned blocks", "mask Jaccard"]
    lines = [f"# Study {study.name}", ""]
    if study.description:
        lines += [study.description, ""]
    lines += [f"Dataset {study.dataset}; seeds {', '.join(map(str, study.seeds))}. Top-1 is mean ± sample standard "
              "deviation over seeds; s / epoch is training time per epoch (ratio: to the first row); pruned blocks is "
              "mean (min–max); mask Jaccard is the mean pairwise Jaccard similarity of the pruned-block sets across seeds "
              "(1 = every seed pruned the same blocks).", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in settings:
        labels = [s["setting"].get(a, "all") for a in axes]
        if "best" not in s:
            lines.append("| " + " | ".join(labels + [f"0/{s['of']}"] + ["–"] * (len(head) - len(axes) - 1)) + " |")
            continue
        pruned = f"{s['pruned'][0]:.1f} ({s['pruned'][1]}–{s['pruned'][2]})" if "pruned" in s else "–"
        jac = f"{s['jaccard']:.2f}" if math.isfinite(s.get("jaccard", math.nan)) else "–"
        lines.append("| " + " | ".join(labels + [f"{s['runs']}/{s['of']}", _pm(s["best"]), _pm(s["final"]),
                                                 f"{s['sec_per_epoch']:.2f}", f"{s['ratio']:.2f}", pruned, jac]) + " |")
    freq = [s for s in settings if "frequency" in s]
    ever = sorted({i for s in freq for i, f in enumerate(s["frequency"]) if f > 0})
    if ever:
        lines += ["", "How often each block was pruned (fraction of seeds; blocks never pruned are left out):", "",
                  "| " + " | ".join([*axes] + [f"b{i}" for i in ever]) + " |", "|" + "---|" * (len(axes) + len(ever))]
        for s in freq:
            f = s["frequency"]
            lines.append("| " + " | ".join([s["setting"].get(a, "all") for a in axes]
                                           + [f"{f[i]:.1f}" if i < len(f) else "–" for i in ever]) + " |")
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(study: Study, out: str | os.PathLike, *, plots: bool = True) -> list[dict[str, Any]]:
    """Write ``study.csv``, ``study.md`` and (with ``plots``) the figures from the runs finished so far."""
    out = Path(out)
    rows = run_rows(study, out)
    columns = ["cell", *study.axes, *RUN_COLUMNS[1:]]
    tmp = out / ".study.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, out / "study.csv")
    settings = setting_rows(study.axes, read_study_csv(out / "study.csv"))
    _atomic(out / "study.md", study_markdown(study, settings))
    if plots and any("best" in s for s in settings):
        from ..viz.study import draw_study

        draw_study(settings, out, title=f"study {study.name} on {study.dataset}")
    return settings


def read_study_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a ``study.csv``."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
