"""Running a study: every cell is an ordinary ``elanet train`` run in ``DIR/runs/<cell>``, in its own process.

A process per cell keeps a crash, a divergence or a kill inside one run, and makes resuming the
trainer's own job: a cell with a finished ``summary.json`` is skipped, one with a ``last.pt`` is
continued with ``elanet train --resume`` (same mask, schedule position and random state, so it ends
as an uninterrupted run would), and anything else starts afresh. Cells are forked from the study
process (torch is imported once), or started as ``python -m elanet train`` where fork is not
available. ``--jobs N`` runs N cells at once and gives each ``threads // N`` CPU threads.

Signals: each cell runs in its own process group. Ctrl-C or SIGTERM to the study is passed on to the
running cells as one SIGINT, so each saves a resumable checkpoint and exits; a second Ctrl-C aborts
them. If the study itself is killed, Linux delivers SIGINT to its cells (``PR_SET_PDEATHSIG``), so
they still stop with a checkpoint.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # Windows: no run-folder locks to wait for
    fcntl = None

import elanet

from ..training.config import save_yaml
from .results import read_run, write_results
from .spec import Cell, Study

__all__ = ["run_study", "check_out_dir", "cell_state"]

STUDY_JSON = "study.json"


def _same(saved: dict, now: dict) -> str | None:
    """The first cell whose results-changing settings differ, or None. Settings only one side knows
    (added by a newer elanet) are not compared, so an upgrade does not orphan a study."""
    old, new = saved.get("cells", {}), now["cells"]
    if saved.get("name") != now["name"]:
        return f"name {saved.get('name')!r}"
    for name in sorted(set(old) ^ set(new)):
        return f"cell {name}"
    for name, cfg in new.items():
        prev = old[name]
        for key in sorted(set(cfg) & set(prev)):
            if cfg[key] != prev[key]:
                return f"cell {name}, {key} {prev[key]!r} -> {cfg[key]!r}"
    return None


def check_out_dir(study: Study, out: Path) -> None:
    """Refuse an ``out`` folder that holds anything but this same study (nothing is written here)."""
    marker = out / STUDY_JSON
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())["identity"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{marker} is not a study record: choose another --out") from None
        diff = _same(saved, json.loads(json.dumps(study.identity())))
        if diff is not None:
            raise ValueError(f"{out} holds a different study ({saved.get('name')!r}; first difference: {diff}): "
                             "choose another --out, or run the same study file with the same flags to continue it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a study folder: choose another --out (an empty or new folder)")


def cell_state(run: Path) -> str:
    """``'done'`` (summary written), ``'resume'`` (a checkpoint to continue from) or ``'new'``."""
    summary = run / "summary.json"
    if summary.is_file():
        try:
            if not json.loads(summary.read_text()).get("interrupted"):
                return "done"
        except json.JSONDecodeError:
            pass
    return "resume" if (run / "last.pt").is_file() else "new"


def _busy(run: Path) -> bool:
    """Whether a process (e.g. a cell of a study killed a moment ago, still saving) holds the run's lock."""
    lock = run / ".lock"
    if fcntl is None or not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock


def _die_with_parent() -> None:
    """In the child: get SIGINT (save and stop) when the study process dies (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _train_in_child(argv: list[str], log_path: str, threads: int) -> None:
    """Body of a forked cell process: ``elanet train ARGV`` with output to the cell's log, then exit."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the study only; it passes each one on, once
    for sig in (signal.SIGINT, signal.SIGTERM):  # not the study's handlers: the trainer's own (it saves on SIGINT)
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    _die_with_parent()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    from ..cli import main

    code = 1
    try:
        code = main(["train", *argv])
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - the traceback goes to the cell's log; the study reports the status
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


class _Proc:
    """A running cell: a forked copy of the study process (torch already imported, so no start-up cost)
    or, where fork is not available, a fresh ``python -m elanet train``."""

    def __init__(self, argv: list[str], log_path: Path, threads: int) -> None:
        if "fork" in mp.get_all_start_methods():
            self._p = mp.get_context("fork").Process(target=_train_in_child, args=(argv, str(log_path), threads))
            self._p.start()
            self.pid = self._p.pid
        else:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(elanet.__file__).parents[1]),
                                                               os.environ.get("PYTHONPATH")]))}
            self._log = open(log_path, "a")
            self._p = subprocess.Popen([sys.executable, "-m", "elanet", "train", *argv], stdout=self._log,
                                       stderr=subprocess.STDOUT, env=env,
                                       creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
            self.pid = self._p.pid

    def poll(self) -> int | None:
        if isinstance(self._p, subprocess.Popen):
            return self._p.poll()
        if self._p.is_alive():
            return None
        self._p.join()
        code = self._p.exitcode
        return 128 - code if code < 0 else code  # killed by a signal: shell-style status

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class _Job:
    cell: Cell
    proc: _Proc
    started: float


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _epochs_done(run: Path) -> int:
    try:
        with open(run / "metrics.csv") as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except OSError:
        return 0


def run_study(
    study: Study,
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    threads: int | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
    poll_s: float = 0.5,
) -> int:
    """Run (or continue) every cell of ``study`` under ``out``; returns 0 when all finished, else 1 (130 if stopped).

    Args:
        study: from :func:`load_study`.
        out: the study folder: ``runs/<cell>/`` run folders, ``cells/<cell>.yaml`` configs, ``logs/<cell>.log``
            training output, ``study.json``, ``study.csv``, ``study.md`` and figures.
        jobs: cells run at once.
        threads: CPU threads shared by the jobs (default: every core).
        plots: draw the study figures after each finished cell.
        log: where progress lines go.
    """
    log = log or (lambda s: print(s, flush=True))
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    out = Path(out)
    check_out_dir(study, out)
    for sub in ("runs", "cells", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    record = {"identity": study.identity(), "source": study.source, "dataset": study.dataset, "axes": study.axes,
              "seeds": study.seeds, "description": study.description}
    tmp = out / f".{STUDY_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / STUDY_JSON)
    per_job = max(1, (threads or os.cpu_count() or 1) // jobs)

    cells = {c.name: c for c in study.cells}
    done = {n for n in cells if cell_state(out / "runs" / n) == "done"}
    failed: dict[str, str] = {}
    pending = [n for n in cells if n not in done]
    running: dict[str, _Job] = {}
    stop = {"requested": False}
    t0, epochs0 = time.time(), sum(_epochs_done(out / "runs" / n) for n in cells)
    total_epochs = sum(c.config.epochs for c in study.cells)
    log(f"study {study.name}: {len(cells)} cells ({' x '.join(study.axes + ['seed'])}) on {study.dataset} | "
        f"{len(done)} done, {len(pending)} to run | {jobs} at once, {per_job} thread(s) each | {out}")

    def on_signal(signum, frame) -> None:  # Ctrl-C or SIGTERM: each running cell saves a checkpoint and stops
        if not stop["requested"]:
            log("study: stopping; the running cells save a resumable checkpoint (Ctrl-C again aborts them)")
        stop["requested"] = True
        for job in running.values():
            job.proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, on_signal), (signal.SIGINT, on_signal))}
    last_progress = 0.0

    def progress(force: bool = False) -> None:
        nonlocal last_progress
        if not force and time.time() - last_progress < 30:
            return
        last_progress = time.time()
        now_epochs = sum(_epochs_done(out / "runs" / n) for n in cells)
        rate = (now_epochs - epochs0) / max(time.time() - t0, 1e-9)
        left = total_epochs - now_epochs
        eta = _fmt_s(left / rate) if rate > 0 else "unknown until an epoch finishes"
        log(f"study {study.name}: {len(done)} done, {len(running)} running, {len(pending)} left"
            + (f", {len(failed)} failed" if failed else "") + f" | {_fmt_s(time.time() - t0)} elapsed, ETA {eta}")

    try:
        while running or (pending and not stop["requested"]):
            while pending and len(running) < jobs and not stop["requested"]:
                ready = [n for n in pending if (cells[n].match is None or cells[n].match in done
                                                or cells[n].match in failed) and not _busy(out / "runs" / n)]
                if not ready:
                    break
                name = ready[0]
                pending.remove(name)
                cell = cells[name]
                if cell.match in failed:
                    failed[name] = f"its match {cell.match} failed"
                    continue
                try:
                    running[name] = _start(cell, out, per_job)
                except (ValueError, OSError) as e:  # e.g. a matched run whose counts do not fit this cell
                    failed[name] = str(e)
                    log(f"  FAILED {name}: {e}")
                progress(force=True)
            for name, job in list(running.items()):
                rc = job.proc.poll()
                if rc is None:
                    continue
                del running[name]
                if rc == 0 and cell_state(out / "runs" / name) == "done":
                    done.add(name)
                    log(f"  finished {name} in {_fmt_s(time.time() - job.started)}")
                    _write(study, out, plots, log)
                elif rc == 130 or stop["requested"]:
                    log(f"  stopped {name}: it continues from its checkpoint when the study is run again")
                else:
                    failed[name] = f"exit status {rc}, see {out / 'logs' / (name + '.log')}"
                    log(f"  FAILED {name}: {failed[name]}")
                progress(force=True)
            startable = any(cells[n].match is None or cells[n].match in done | set(failed) for n in pending)
            if not running and (stop["requested"] or not startable):
                break  # stopped, finished, or only cells whose match can never finish are left
            time.sleep(poll_s)
            progress()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    _write(study, out, plots, log)
    if stop["requested"]:
        log(f"study stopped: {len(done)}/{len(cells)} cells done; run the same command again to continue")
        return 130
    if failed or len(done) < len(cells):
        for name, why in failed.items():
            log(f"  failed: {name} ({why})")
        log(f"study {study.name}: {len(done)}/{len(cells)} cells done, {len(failed)} failed, {len(pending)} not started; fix the cause and run the "
            "same command again (finished cells are kept)")
        return 1
    log(f"study {study.name}: all {len(cells)} cells done | {out / 'study.md'}")
    return 0


def _start(cell: Cell, out: Path, threads: int) -> _Job:
    """Start (or continue) one cell; a matched fixed-count cell gets its partner's per-round counts here."""
    run = out / "runs" / cell.name
    state = cell_state(run)
    cmd = []
    if state == "resume":
        cmd += ["--resume", str(run), "--threads", str(threads)]
    else:
        if run.exists():  # started but killed before its first checkpoint: nothing to keep
            shutil.rmtree(run)
        cfg = cell.config
        if cell.match is not None:
            rounds = read_run(out / "runs" / cell.match)["rounds"]
            counts = [len(r["pruned"]) for r in rounds]
            counts += [0] * (len(cfg.windows) - len(counts))  # rounds that never came (none when windows match)
            cfg = type(cfg)(**{**cfg.to_dict(), "fixed_count": counts[: len(cfg.windows)]})
            cfg.validate()
        cfg = type(cfg)(**{**cfg.to_dict(), "out": None, "threads": threads})
        save_yaml(cfg, out / "cells" / f"{cell.name}.yaml")
        cmd += ["--config", str(out / "cells" / f"{cell.name}.yaml"), "--out", str(run)]
    log_path = out / "logs" / f"{cell.name}.log"
    with open(log_path, "a") as f:
        f.write(f"$ elanet train {' '.join(cmd)}\n")
    return _Job(cell, _Proc(cmd, log_path, threads), time.time())


def _write(study: Study, out: Path, plots: bool, log: Callable[[str], None]) -> None:
    try:
        write_results(study, out, plots=plots)
    except Exception as e:  # noqa: BLE001 - the tables are redrawn after the next cell; never lose a run over them
        log(f"warning: could not write the study tables ({type(e).__name__}: {e})")
