"""The run folder: created or reopened by one process at a time, with small files written atomically.

Layout: ``config.yaml`` (resolved settings), ``metrics.csv`` (one row per epoch), ``pruning.json``
(every pruning round), ``last.pt`` / ``best.pt`` (checkpoints), ``summary.json`` (when the run ends),
``tb/`` (TensorBoard) and ``.lock`` (held while a process trains in the folder).
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["RunFolder", "RunLockedError", "creatable", "write_json", "write_text", "disk_error"]


def creatable(path: Path) -> str | None:
    """Why ``path`` cannot be created (its nearest existing ancestor is a file or not writable), or None."""
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return f"{base} is a file"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable"
    return None


class RunLockedError(ValueError):
    """Another live process trains in the run folder."""


def disk_error(e: OSError, path: Path) -> OSError:
    """``e`` with a one-line message that names ``path`` and, for a full disk, says so."""
    if e.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on device writing {path}: free space there and resume the run")
    return OSError(e.errno, f"cannot write {path}: {e.strerror or e}")


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically (temporary file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, path) from None


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))


class RunFolder:
    """A run folder held by this process (see the module docstring for its files).

    Use :meth:`plan` then :meth:`create` for a new run and :meth:`reopen` to resume; both take the folder's
    lock, which the operating system releases when the process ends, however it ends (no stale locks).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    @classmethod
    def plan(cls, path: str | os.PathLike) -> "RunFolder":
        """Check that a new run can live at ``path`` (empty or absent, creatable); writes nothing yet:
        :meth:`create` makes it once the run's data and model are built."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {p} is a file: choose a folder path for the run")
        if p.is_dir() and any(p.iterdir()):
            if (p / "config.yaml").is_file():
                raise ValueError(f"run folder {p} already exists: continue it with --resume {p} or choose another --out")
            raise ValueError(f"folder {p} already exists and is not empty: choose another --out")
        problem = creatable(p)
        if problem:
            raise ValueError(f"cannot create run folder {p}: {problem}; choose another --out")
        return cls(p)

    def create(self) -> None:
        """Make the planned folder and take its lock."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create run folder {self.path} ({e.strerror or e}): choose another --out") from None
        self.lock()
        if any(p.name != ".lock" for p in self.path.iterdir()):  # another run took the folder since plan()
            self.release()
            raise ValueError(f"run folder {self.path} was filled by another process: choose another --out")

    @classmethod
    def reopen(cls, path: str | os.PathLike) -> "RunFolder":
        """Take over an existing run folder to resume it; removes temporary files a killed writer left."""
        p = Path(path)
        if not (p / "config.yaml").is_file():
            raise ValueError(f"{p} is not a run folder (no config.yaml): pass a folder written by `elanet train`")
        folder = cls(p)
        folder.lock()
        folder.remove_stale_tmp()
        return folder

    def lock(self) -> None:
        """Hold ``.lock`` (an exclusive ``flock``); raise :class:`RunLockedError` naming the holder."""
        lock = self.path / ".lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"cannot write in run folder {self.path} ({e.strerror or e}): choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"run folder {self.path} is in use by {holder}: wait for that run to finish "
                                 f"or stop it, then resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def remove_stale_tmp(self) -> list[Path]:
        """Delete ``.*.tmp`` files (a writer killed mid-write); safe only while holding the lock."""
        stale = sorted(self.path.glob(".*.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # metrics.csv
    def start_metrics(self, columns: Sequence[str], *, keep_until: int | None = None) -> None:
        """Write the header, or on resume keep only the rows of epochs ``<= keep_until`` (the checkpoint's)."""
        path = self.path / "metrics.csv"
        rows = [list(columns)]
        if keep_until is not None and path.exists():
            with open(path, newline="") as f:
                old = list(csv.reader(f))
            if old and old[0] != list(columns):
                raise ValueError(f"{path} has columns {old[0]}, expected {list(columns)}: it belongs to another kind of run")
            rows += [r for r in old[1:] if r and r[0].isdigit() and int(r[0]) <= keep_until]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        write_text(path, buf.getvalue())

    def append_metrics(self, row: Sequence[Any]) -> None:
        path = self.path / "metrics.csv"
        try:
            with open(path, "a", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
                f.flush()
        except OSError as e:
            raise disk_error(e, path) from None
