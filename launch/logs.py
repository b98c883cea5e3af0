"""The launcher's logs: rank 0 on the terminal, every rank in ``DIR/logs/rank<r>.log`` for a job folder.

Ranks other than 0 send everything (Python warnings, C++ messages, tracebacks) to their log file only, so the
terminal shows rank 0; without a log folder (a single video written to explicit paths) they show only errors,
prefixed with their rank.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

LOGGER = "k5.launch"


class _TerminalHandler(logging.StreamHandler):
    """Log lines above rank 0's progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class Logs:
    """The launcher's logger: rank 0 on the terminal (plain messages), every rank in ``log_dir/rank<r>.log``.

    ``close()`` removes everything this added, so ``main()`` can run several times in one process (tests).
    """

    def __init__(self, rank: int, log_dir: Path | None):
        self.rank, self.log_dir = rank, log_dir
        self.log = logging.getLogger(LOGGER)
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        self.handlers: list[logging.Handler] = []
        self.saved_fds: list[tuple[int, int]] = []
        self.path = None if log_dir is None else Path(log_dir) / f"rank{rank}.log"
        terminal = _TerminalHandler(sys.stderr)
        if rank == 0:
            terminal.setFormatter(logging.Formatter("%(message)s"))
            self._add(terminal)
        elif log_dir is None:
            terminal.setLevel(logging.ERROR)
            terminal.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
            self._add(terminal)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
            file.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
            self._add(file)
            if rank != 0:
                self._redirect_fds()
            file.handle(logging.makeLogRecord({  # to the file only: a new run starts here
                "name": LOGGER, "levelno": logging.INFO, "levelname": "INFO",
                "msg": f"---- rank {rank} on {socket.gethostname()}, pid {os.getpid()}, argv {sys.argv[1:]}"}))

    def log_file(self, rank: int) -> str | None:
        """Where rank ``rank`` logs (None without a log folder)."""
        return None if self.log_dir is None else str(Path(self.log_dir) / f"rank{rank}.log")

    def _add(self, handler: logging.Handler) -> None:
        self.log.addHandler(handler)
        self.handlers.append(handler)

    def _redirect_fds(self) -> None:
        # Everything written to this rank's stdout/stderr (warnings, C++ messages, a traceback the launcher does
        # not catch) goes to its log: the terminal belongs to rank 0.
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for target in (1, 2):
            self.saved_fds.append((target, os.dup(target)))
            os.dup2(fd, target)
        os.close(fd)

    def detail(self, message: str, level: int = logging.ERROR) -> None:
        """To the log file only (a traceback: the terminal gets the one-line explanation); to the terminal when
        there is no log file, so it is never lost."""
        record = self.log.makeRecord(LOGGER, level, "", 0, message, None, None)
        files = [h for h in self.handlers if isinstance(h, logging.FileHandler)]
        for h in files or self.handlers:
            if record.levelno >= h.level:
                h.handle(record)

    def flush(self) -> None:
        for h in self.handlers:
            h.flush()
        sys.stdout.flush()
        sys.stderr.flush()

    def close(self) -> None:
        self.flush()
        for h in self.handlers:
            self.log.removeHandler(h)
            h.close()
        for target, saved in reversed(self.saved_fds):
            os.dup2(saved, target)
            os.close(saved)
        self.handlers, self.saved_fds = [], []
