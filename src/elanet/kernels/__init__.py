"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Two kernel files, built into one library: ``epilogue.c``, the attention branch's BatchNorm +
activation + DropPath + residual add in one pass each way, MRLA-L's gated mix before it (see
``attention/epilogue.py``) and MRLA-B's retrieval (``attention/aggregate.py``); and ``depthwise.c``,
the value convolution with the descriptor's pooling (``attention/depthwise.py``) and, for inference,
a fully pruned stage's remaining block in one pass (``export.LoneValue``). They are plain C
with OpenMP, about a second to build, linked against the ``libgomp`` that PyTorch ships so that it runs on torch's own
thread pool. The shared library is cached under ``$ELANET_CACHE/kernels`` (see
:func:`elanet.runtime.default_cache_dir`), keyed by the source, the flags and the compiler, and
written atomically, so concurrent processes (DDP ranks) may build it at once.

Where it cannot be built (no compiler, not Linux, a PyTorch without libgomp) elanet warns once and
runs the same computation with PyTorch operators. ``ELANET_KERNELS=0`` turns the kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ..runtime import default_cache_dir

__all__ = ["epilogue_lib", "build_error"]

_SOURCES = [Path(__file__).with_name(name) for name in ("epilogue.c", "depthwise.c")]
_HEADER = Path(__file__).with_name("common.h")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_GEOM = [_PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64]  # a, B, G, R, d, sb, sg, sr
_SIGNATURES = {
    "elanet_epi_stats": (_INT, _GEOM + [_PTR, _PTR]),
    "elanet_epi_forward": (None, _GEOM + [_PTR, _PTR, _PTR, _PTR, _INT, _PTR]),
    "elanet_epi_backward_sums": (_INT, _GEOM + [_PTR, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _PTR]),
    "elanet_epi_backward": (None, _GEOM + [_PTR, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _PTR, _PTR, _PTR]),
    # MRLA-L: v, id, gate, lam, B, R, C, ...
    "elanet_mix_stats": (_INT, [_PTR] * 4 + [_I64] * 3 + [_PTR, _PTR]),
    "elanet_mix_forward": (None, [_PTR] * 4 + [_I64] * 3 + [_PTR] * 5),
    "elanet_mix_backward_sums": (_INT, [_PTR] * 4 + [_I64] * 3 + [_PTR] * 5),
    "elanet_mix_backward": (_INT, [_PTR] * 4 + [_I64] * 3 + [_PTR] * 10),
    # MRLA-B / ELA retrieval: values (pointer array), n, B, R, C, ...
    "elanet_ret_forward": (_INT, [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR]),
    "elanet_ret_backward": (_INT, [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR]),
    # value convolution: x, B, H, W, C, w9, ...
    "elanet_dw_forward": (_INT, [_PTR] + [_I64] * 4 + [_PTR, _PTR, _INT, _PTR, _PTR]),  # ..., w9, bias, lone, v, rowsum
    "elanet_dw_backward": (_INT, [_PTR, _PTR] + [_I64] * 4 + [_PTR] * 5),
}


def _cpu_flags() -> list[str]:
    """``-mavx2`` and ``-mfma`` where this x86 CPU has them (twice the vector width of the baseline
    SSE2; fused multiply-adds, which only ``depthwise.c`` asks for explicitly: ``-ffp-contract=off``
    keeps the compiler from contracting anything else); named explicitly rather than
    ``-march=native`` so that the cache key tells CPUs apart."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    if os.uname().machine != "x86_64":
        return []
    return [flag for flag, name in (("-mavx2", " avx2"), ("-mfma", " fma")) if name in info]


def _build() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        raise RuntimeError("native kernels are built on Linux only")
    gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not gomp.is_file():
        raise RuntimeError(f"this PyTorch has no {gomp.name} to share its thread pool with")
    flags = _FLAGS + _cpu_flags()
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[:1]
    texts = [p.read_text() for p in (*_SOURCES, _HEADER)]
    key = hashlib.sha256("\0".join([*texts, *flags, cc, *version, str(gomp)]).encode()).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"epilogue-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, *map(str, _SOURCES), "-o", tmp, f"-L{gomp.parent}", "-l:libgomp.so.1", f"-Wl,-rpath,{gomp.parent}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def epilogue_lib() -> ctypes.CDLL | None:
    """The loaded epilogue kernels, building them on first use; ``None`` where they are unavailable or off."""
    global _lib, _error, _tried
    if not _tried:
        _tried = True
        if os.environ.get("ELANET_KERNELS", "1") == "0":
            _error = "turned off by ELANET_KERNELS=0"
        else:
            try:
                _lib = _build()
            except (OSError, RuntimeError, AttributeError) as e:
                _error = str(e)
                warnings.warn(f"elanet: the fused CPU attention kernels are unavailable ({e}); training runs the same "
                              "computation with PyTorch operators, more slowly. Set ELANET_KERNELS=0 to silence this.",
                              RuntimeWarning, stacklevel=2)
    return _lib


def build_error() -> str | None:
    """Why :func:`epilogue_lib` returned ``None`` (after it was called), else ``None``."""
    return _error
