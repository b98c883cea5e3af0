"""How the server's ranks share its work: a mailbox of small keys, and the loop every rank runs.

Rank 0 (the dispatcher, k5.serve.dispatch) hands each data-parallel group its jobs as numbered entries,
``serve/g<group>/<n>``: ``{"id", "spec"}`` for a job, ``{"close": true}`` when the server stops. Every rank of the
group reads the entries in order (polling: an idle rank must not sit in a collective, which would time out) and
runs each job together with the others (k5.serve.engine.Engine.run); the group's leader reports progress after
each step (``serve/progress/<id>``) and the outcome at the end (``serve/g<group>/done<n>``); a DELETE reaches the
group as ``serve/cancel/<id>``, which the leader reads at each step boundary and the group agrees on.

Under torchrun the mailbox is the rendezvous TCPStore (through k5.launch.channel.Channel, each thread its own
client); on one process it is a dict.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from k5.launch.logs import LOGGER
from k5.launch.signals import Stopped
from k5.serve.engine import Cancelled

log = logging.getLogger(LOGGER)
POLL_S = 0.005  # how often an idle rank looks for its next entry on the store


class LocalMailbox:
    """The mailbox of a one-process server: a dict; ``on_put`` wakes the dispatcher at once."""

    def __init__(self):
        self.items: dict[str, object] = {}
        self.cond = threading.Condition()
        self.on_put: Callable[[], None] | None = None

    def put(self, key: str, value) -> None:
        with self.cond:
            self.items[key] = value
            self.cond.notify_all()
        if self.on_put is not None:
            self.on_put()

    def get(self, key: str):
        with self.cond:
            return self.items.get(key)

    def delete(self, key: str) -> None:
        with self.cond:
            self.items.pop(key, None)

    def add(self, key: str, n: int) -> int:
        with self.cond:
            self.items[key] = self.items.get(key, 0) + n
            self.cond.notify_all()
            return self.items[key]

    def wait_for(self, key: str, alive: Callable[[], None] = lambda: None):
        with self.cond:
            while key not in self.items:
                self.cond.wait(0.5)
                alive()
            return self.items[key]

    def client(self) -> "LocalMailbox":
        return self


class StoreMailbox:
    """The mailbox on the rendezvous TCPStore, through this thread's own store client."""

    def __init__(self, channel):
        self.channel = channel

    def put(self, key: str, value) -> None:
        self.channel.put(f"serve/{key}", value)

    def get(self, key: str):
        return self.channel.poll(f"serve/{key}")

    def delete(self, key: str) -> None:
        self.channel.store.delete_key(f"serve/{key}")

    def add(self, key: str, n: int) -> int:
        return self.channel.counter(f"serve/{key}", n)

    def wait_for(self, key: str, alive: Callable[[], None] = lambda: None):
        while (value := self.get(key)) is None:
            alive()
            time.sleep(POLL_S)
        return value

    def client(self) -> "StoreMailbox":
        """A mailbox on a new store client, for another thread."""
        from k5.launch.channel import Channel

        ch = self.channel
        return StoreMailbox(Channel(ch.rank, ch.world, ch.store.timeout.total_seconds()))


def make_mailbox(sup) -> LocalMailbox | StoreMailbox:
    return LocalMailbox() if sup.channel is None else StoreMailbox(sup.channel)


class GroupWorker:
    """This rank's part of its group's jobs: read the group's entries in order, run each, and (the leader) report.

    ``on_step`` / ``should_stop`` are the points the engine calls at every step boundary; they are methods so that
    what happens there is one place to read."""

    def __init__(self, engine, sup, mailbox, jobs_dir: Path):
        self.engine, self.sup, self.mailbox, self.jobs_dir = engine, sup, mailbox, Path(jobs_dir)
        self.group, self.leader = engine.group, engine.leader

    def serve(self) -> None:
        """Until the dispatcher closes this group (the server stops)."""
        n = 0
        self.mailbox.put(f"peak/{self.engine.rank}", self.engine.peak_memory())
        while True:
            entry = self.mailbox.wait_for(f"g{self.group}/{n}")
            if entry.get("close"):
                log.info("group %d: closed after %d job(s)", self.group, n)
                return
            report = self.run(entry["id"], entry["spec"])
            self.mailbox.put(f"peak/{self.engine.rank}", self.engine.peak_memory())
            if self.leader:
                self.mailbox.put(f"g{self.group}/done{n}", report)
            n += 1

    def run(self, job_id: str, spec: dict) -> dict:
        log.info("job %s: starting (%s)", job_id, spec["request"]["prompt"][:80])
        t0 = time.perf_counter()
        try:
            done = self.engine.run(spec, self.jobs_dir / job_id, job_id,
                                   on_step=lambda d, t: self.on_step(job_id, d, t),
                                   should_stop=lambda: self.should_stop(job_id))
        except Cancelled as e:
            log.info("job %s: %s", job_id, e)
            return {"status": "cancelled", "message": f"cancelled by DELETE /v1/videos/{job_id}: {e}"}
        except Stopped:
            log.info("job %s: stopped (the server is stopping); it runs again after a restart", job_id)
            return {"status": "stopped"}
        if done is None:
            return {"status": "completed"}
        m = done.metrics
        log.info("job %s: done in %.2f s -> %s", job_id, time.perf_counter() - t0, ", ".join(done.files))
        return {"status": "completed", "files": done.files,
                "metrics": {"step_s": m["step_s"], "total_s": m["total_s"], "write_s": m.get("write_s"),
                            "dit_forwards": {"run": m["dit_forwards"]["run"],
                                             "skipped": len(m["dit_forwards"]["skipped"])},
                            "prompt_expansion": m.get("prompt_expansion")}}

    def on_step(self, job_id: str, done: int, total: int) -> None:
        """After each denoising step: the leader publishes the job's progress."""
        if self.leader:
            self.mailbox.put(f"progress/{job_id}", [done, total])

    def should_stop(self, job_id: str) -> bool:
        """The leader's word on a DELETE of the job (the group agrees on it in the engine)."""
        return self.leader and self.mailbox.get(f"cancel/{job_id}") is not None
