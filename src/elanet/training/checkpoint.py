"""Checkpoints: written atomically, plain data that loads with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import create_model

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "resolve_checkpoint", "model_from_checkpoint"]

FORMAT = "elanet-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A crash or Ctrl-C during the write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", prefer: str = "best") -> dict[str, Any]:
    """Load an elanet checkpoint (file or run folder) with ``weights_only=True``.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: the file is truncated, corrupt or not an elanet checkpoint.
    """
    p = resolve_checkpoint(path, prefer=prefer)
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p} is corrupt or truncated (not a torch archive); use another checkpoint of the run (last.pt / best.pt)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        why = "it holds objects that are not plain data" if "Weights only" in str(e) else f"corrupt or truncated: {type(e).__name__}"
        raise ValueError(f"{p} is not a readable elanet checkpoint ({why}); use another checkpoint of the run (last.pt / best.pt)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{p} is not an elanet checkpoint (no '{FORMAT}' marker): pass a file written by `elanet train`")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint with its weights and its pruned structure (the ELA mask)."""
    model = create_model(ckpt["model_name"], num_classes=ckpt["num_classes"], in_chans=ckpt["in_chans"])
    model.load_state_dict(ckpt["model"])  # each ELA block's `active` flag travels as module extra state
    return model.to(device)
