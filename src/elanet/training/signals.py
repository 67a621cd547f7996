"""Stop requests: the first SIGINT (Ctrl-C), SIGTERM or SIGUSR1 asks for a clean stop after the current step.

SLURM sends SIGUSR1 (with ``--signal``) or SIGTERM before pre-empting a job, and torchrun forwards SIGTERM
to its workers: each of these lets the trainer finish the step, save a resumable checkpoint and exit. A
second signal aborts at once.
"""
from __future__ import annotations

import signal
import sys
import threading

__all__ = ["StopSignals", "STOP_SIGNALS"]

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


class StopSignals:
    """Context manager that turns stop signals into a flag checked after every step.

    Attributes:
        requested: a stop was asked for (by a signal, or set by the trainer when another rank was asked).
        signum: the first signal received, or None.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals, self.requested, self.signum = signals, False, None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name}): aborted without saving")
        self.requested, self.signum = True, signum
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a resumable checkpoint (send it again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
