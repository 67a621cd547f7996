"""Checkpoints: written atomically, checksummed, plain data that loads with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import create_model
from .run_dir import disk_error

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "resolve_checkpoint", "model_from_checkpoint",
           "payload_checksum"]

FORMAT = "elanet-checkpoint-v2"
_OLD_FORMATS = ("elanet-checkpoint-v1",)  # no checksum; loads for eval / viz


def payload_checksum(obj: Any) -> str:
    """SHA-256 of a checkpoint payload: every tensor's dtype, shape and bytes and every other value, in order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


class _Sink:
    """The temporary file as torch.save sees it; keeps the OS error of a failed write (torch rewords it)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` with a payload checksum to ``path`` atomically: a temporary file in the same
    folder, fsync, then rename. A crash or Ctrl-C during the write leaves the previous checkpoint intact.

    Raises:
        OSError: the write failed; a full disk says "no space left on device" (the old file is kept).
    """
    path = Path(path)
    payload = {"format": FORMAT, **state}
    payload["checksum"] = payload_checksum(payload)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise disk_error(e, path) from None
    sink = None
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            torch.save(payload, sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = sink.error if sink is not None and sink.error is not None else e
        if isinstance(cause, OSError):
            raise disk_error(cause, path) from None
        if isinstance(e, RuntimeError) and _disk_full(path.parent):
            raise disk_error(OSError(errno.ENOSPC, "no space left on device"), path) from None
        raise


def _disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def resolve_checkpoint(path: str | os.PathLike, *, prefer: str = "best") -> Path:
    """A checkpoint file, or a run folder (its ``best.pt``, else ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        order = ["best.pt", "last.pt"] if prefer == "best" else ["last.pt", "best.pt"]
        for name in order:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p} holds no best.pt or last.pt: pass a checkpoint file or a run folder written by `elanet train`")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist: pass a .pt file or a run folder written by `elanet train`")
    return p


_REQUIRED = ("model_name", "model")


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", prefer: str = "best") -> dict[str, Any]:
    """Load an elanet checkpoint (file or run folder) with ``weights_only=True`` and verify its checksum.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: the file is truncated, corrupt (checksum mismatch) or not an elanet checkpoint.
    """
    p = resolve_checkpoint(path, prefer=prefer)
    other = "; use the run's other checkpoint (last.pt / best.pt)"
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p} is corrupt or truncated (not a torch archive){other}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged archive or pickle raises almost any type
        why = "it holds objects that are not plain data" if "Weights only" in str(e) else f"corrupt: {type(e).__name__}"
        raise ValueError(f"{p} is not a readable elanet checkpoint ({why}){other}") from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt not in (FORMAT, *_OLD_FORMATS):
        raise ValueError(f"{p} is not an elanet checkpoint (no '{FORMAT}' marker): pass a file written by `elanet train`")
    if fmt == FORMAT:
        stored = ckpt.pop("checksum", None)
        if stored != payload_checksum(ckpt):
            raise ValueError(f"{p} is corrupt (its checksum does not match its contents){other}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"{p} lacks {', '.join(missing)}: it is damaged or not a training checkpoint{other}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint with its weights and its pruned structure (the ELA mask)."""
    missing = [k for k in ("num_classes", "in_chans") if k not in ckpt]
    if missing:
        raise ValueError(f"the checkpoint lacks {', '.join(missing)}: it is not a classification checkpoint of `elanet train`")
    model = create_model(ckpt["model_name"], num_classes=ckpt["num_classes"], in_chans=ckpt["in_chans"])
    model.load_state_dict(ckpt["model"])  # each ELA block's `active` flag travels as module extra state
    return model.to(device)
