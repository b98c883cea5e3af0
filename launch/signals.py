"""Stopping on SIGTERM / SIGINT, and the exit codes every rank ends with.

A signal only sets a flag; the work loop reads it at safe points (between denoising steps, between items), so
nothing is interrupted half-way. The ranks that share an item agree on stopping with one small collective
(``Supervisor.agree_stop``), which also carries the signal: a rank that was not signalled itself exits with the
same code as the one that was.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad input: nothing ran


def stop_exit_code(signum: int | None) -> int:
    """128 + the signal: 143 for SIGTERM (Slurm, kill, torchrun passing it on), 130 for SIGINT (Ctrl-C)."""
    return 128 + (signum or signal.SIGTERM)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a stop request"


class Stopped(Exception):
    """The job was asked to stop (SIGTERM / SIGINT, here or on another rank); the current item is discarded."""


class StopSignals:
    """SIGTERM / SIGINT set a flag that the work loop reads at safe points; a second Ctrl-C ends at once."""

    def __init__(self):
        self.signum: int | None = None
        self.event = threading.Event()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            os._exit(stop_exit_code(signum))  # Ctrl-C twice: the user wants out now
        if self.signum is None:
            self.signum = signum
        self.event.set()

    @property
    def exit_code(self) -> int:
        return stop_exit_code(self.signum)

    @property
    def name(self) -> str:
        return signal_name(self.signum)
