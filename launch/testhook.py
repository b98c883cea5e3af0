"""The test hook (not for production): make one rank fail in a chosen way at a chosen point.

``K5_TEST_FAIL="rank=1,item=0,step=2,mode=raise"`` makes rank 1 act right after denoising step 2 (1-based) of item
0 (the index in the prompt file; no ``item``: the rank's first item; no ``step``: step 1):

- ``raise``: raise a RuntimeError (a rank that fails with a message);
- ``kill``: SIGKILL itself (a crash without a word: the OOM killer, a lost node);
- ``hang``: block forever (a stuck rank; only the others' timeout ends it);
- ``gate``: hold until the job is asked to stop (a signal here or on another rank), then go on. Tests use it to
  stop a job that cannot have finished before the signal, whatever the machine's load.

With ``mark=PATH`` a hanging or holding rank creates PATH when it starts to, so a test knows when to act.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

TEST_HOOK = "K5_TEST_FAIL"
MODES = ("raise", "kill", "hang", "gate")


@dataclass(frozen=True)
class Injection:
    rank: int
    item: int | None
    step: int
    mode: str
    mark: str | None = None

    @classmethod
    def from_env(cls) -> "Injection | None":
        spec = os.environ.get(TEST_HOOK)
        if not spec:
            return None
        try:
            kv = dict(part.split("=", 1) for part in spec.split(","))
            item = kv.get("item")
            inj = cls(int(kv["rank"]), None if item is None else int(item), int(kv.get("step", 1)),
                      kv.get("mode", "raise"), kv.get("mark"))
        except (ValueError, KeyError):
            raise ValueError(f"{TEST_HOOK}={spec!r} must look like rank=1,item=0,step=1,mode=raise") from None
        if inj.mode not in MODES:
            raise ValueError(f"{TEST_HOOK} mode must be one of {', '.join(MODES)}, got {inj.mode!r}")
        return inj

    def fire(self, rank: int, item: int, first_item: int, step: int, stop: threading.Event | None = None) -> None:
        """Act if this is the chosen rank, item and step; ``stop`` is set when the job is asked to stop."""
        if rank != self.rank or step != self.step or item != (first_item if self.item is None else self.item):
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mark and self.mode in ("hang", "gate"):
            Path(self.mark).touch()
        if self.mode == "hang":
            threading.Event().wait()
        if self.mode == "gate":
            (stop or threading.Event()).wait()
            return
        raise RuntimeError(f"injected failure ({TEST_HOOK}) at rank {rank}, item {item}, after step {step}")
