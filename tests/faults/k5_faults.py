"""Fault injection for the tests: make one rank fail in a chosen way at a chosen point. Not part of k5.

``K5_TEST_FAIL="rank=1,item=0,step=2,mode=raise"`` makes rank 1 act right after denoising step 2 (1-based) of item 0
(the index in the prompt file; no ``item``: the rank's first item; no ``step``: step 1):

- ``raise``: raise a RuntimeError (a rank that fails with a message);
- ``kill``: SIGKILL itself (a crash without a word: the OOM killer, a lost node);
- ``hang``: block forever (a stuck rank; only the others' timeout ends it);
- ``gate``: hold until the job is asked to stop (a signal here or on another rank), then go on. Tests use it to
  stop a job that cannot have finished before the signal, whatever the machine's load.

With ``mark=PATH`` a hanging or holding rank creates PATH when it starts to, so a test knows when to act.

The shipped supervisor reads no such variable: the injection wraps ``Supervisor.step_done`` (what every rank runs
after each denoising step, before the group's stop agreement) from outside. Child processes get it through
``sitecustomize.py`` in this folder (``child_env`` puts the folder on their PYTHONPATH); a test in this process
calls ``install``.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

VARIABLE = "K5_TEST_FAIL"
MODES = ("raise", "kill", "hang", "gate")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Injection:
    rank: int
    item: int | None
    step: int
    mode: str
    mark: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "Injection":
        try:
            kv = dict(part.split("=", 1) for part in spec.split(","))
            item = kv.get("item")
            inj = cls(int(kv["rank"]), None if item is None else int(item), int(kv.get("step", 1)),
                      kv.get("mode", "raise"), kv.get("mark"))
        except (ValueError, KeyError):
            raise ValueError(f"{VARIABLE}={spec!r} must look like rank=1,item=0,step=1,mode=raise") from None
        if inj.mode not in MODES:
            raise ValueError(f"{VARIABLE} mode must be one of {', '.join(MODES)}, got {inj.mode!r}")
        return inj

    def fire(self, rank: int, item: int | None, first_item: int | None, step: int,
             stop: threading.Event | None = None) -> None:
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
        raise RuntimeError(f"injected failure ({VARIABLE}) at rank {rank}, item {item}, after step {step}")


def install(spec: str | None = None):
    """Wrap ``Supervisor.step_done`` so that the injection ``spec`` (default: the environment's) fires after each
    step; returns a function that undoes it (None when there is nothing to inject)."""
    spec = os.environ.get(VARIABLE) if spec is None else spec
    if not spec:
        return None
    injection = Injection.parse(spec)
    from k5.launch.supervisor import Supervisor

    original = Supervisor.step_done

    def step_done(self, step: int) -> None:
        original(self, step)
        injection.fire(self.rank, self.item, self.first_item, step + 1, stop=self.signals.event)

    Supervisor.step_done = step_done

    def undo() -> None:
        Supervisor.step_done = original

    return undo


def child_env(spec: str, base: dict | None = None) -> dict:
    """The environment of a child process (and of the processes it starts: torchrun's workers) that injects
    ``spec``: the variable, and this folder first on PYTHONPATH so its sitecustomize runs at their start."""
    base = dict(os.environ if base is None else base)
    path = [str(HERE)] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**base, VARIABLE: spec, "PYTHONPATH": os.pathsep.join(path)}
