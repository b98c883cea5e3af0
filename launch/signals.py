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
    """SIGTERM / SIGINT set a flag that the work loop reads at safe points; a second Ctrl-C ends at once.

    Python runs a signal handler only when the main thread executes Python code, and a rank waiting in a
    collective sits in C++ for as long as the collective lasts, which can be until the timeout: the peer it waits
    for will not arrive before it hears of the stop. So the C-level handler also writes the signal to a pipe
    (``signal.set_wakeup_fd``), which the watchdog thread reads (``drain``) while the main thread is blocked.
    Every delivery writes one byte, and whichever thread reads it counts it, so each signal is counted once.
    """

    def __init__(self):
        self.signum: int | None = None
        self.event = threading.Event()
        self._previous: dict[int, object] = {}
        self._previous_fd: int | None = None
        self._pipe: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pipe = os.pipe()
        for fd in self._pipe:
            os.set_blocking(fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _handle(self, signum, frame) -> None:
        if self._pipe is None:
            self._note(signum)
        self.drain()

    def drain(self) -> None:
        """Count the signals delivered since the last call (any thread)."""
        if self._pipe is None:
            return
        while True:
            try:
                data = os.read(self._pipe[0], 64)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._note(signum)

    def _note(self, signum: int) -> None:
        with self._lock:
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
