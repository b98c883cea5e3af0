"""Rank 0's dispatcher: the job store on one side, the data-parallel groups on the other.

One thread. Each round it collects the groups' reports (progress, outcomes) into the store and the board, hands
the next queued job (highest priority, then oldest) to each idle group, passes DELETEs of running jobs on to their
groups, and removes results past their retention time. The row of a job is marked in progress before its entry is
posted, and completed only after its files and manifest record are published, so a crash between any two of these
steps leaves a row that a restart runs again (k5.serve.server.recover).

On a stop (SIGTERM here or on any rank) it posts no new job, closes every group after its last entry, and ends
once every group has reported its last job (requeued when it was stopped half-way).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from k5.launch.logs import LOGGER

log = logging.getLogger(LOGGER)
ROUND_S = 0.01  # the longest a round waits for news when nothing wakes it
EXPIRE_EVERY_S = 1.0  # a query on the store; results go within a second of their expires_at


@dataclass
class Board:
    """What rank 0's HTTP handlers read besides the store: readiness, live progress, counters since the start."""

    ready: bool = False  # every rank loaded the model
    stopping: bool = False  # SIGTERM: nothing new is accepted
    progress: dict = field(default_factory=dict)  # job id -> (done, total) of a running job
    counters: dict = field(default_factory=lambda: {
        "accepted": 0, "rejected_queue_full": 0, "invalid": 0, "completed": 0, "failed": 0, "cancelled": 0,
        "requeued": 0})
    step_s_sum: float = 0.0
    step_s_count: int = 0
    forwards_run: int = 0
    forwards_skipped: int = 0
    job_s: list = field(default_factory=list)  # the last jobs' run times, for Retry-After
    peaks: dict = field(default_factory=dict)  # rank -> {"bytes", "kind"}
    finished: dict = field(default_factory=dict)  # job id -> threading.Event, set when it leaves in_progress
    told: dict = field(default_factory=dict)  # job id -> threading.Event, set when its group has heard of a DELETE
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Event = field(default_factory=threading.Event)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def waiter(self, job_id: str) -> threading.Event:
        with self.lock:
            return self.finished.setdefault(job_id, threading.Event())

    def cancel_waiter(self, job_id: str) -> threading.Event:
        with self.lock:
            return self.told.setdefault(job_id, threading.Event())

    def told_group(self, job_id: str) -> None:
        with self.lock:
            event = self.told.pop(job_id, None)
        if event is not None:
            event.set()

    def settle(self, job_id: str) -> None:
        with self.lock:
            self.progress.pop(job_id, None)
            events = [self.finished.pop(job_id, None), self.told.pop(job_id, None)]
        for event in events:
            if event is not None:
                event.set()

    def typical_job_s(self) -> float:
        with self.lock:
            recent = self.job_s[-20:]
        return sum(recent) / len(recent) if recent else 5.0


class Dispatcher:
    def __init__(self, store, mailbox, board: Board, sup, groups: int, jobs_dir: Path, uploads_dir: Path,
                 retention_s: float | None, world: int):
        self.store, self.mailbox, self.board, self.sup = store, mailbox, board, sup
        self.groups, self.jobs_dir, self.uploads_dir = groups, Path(jobs_dir), Path(uploads_dir)
        self.retention_s, self.world = retention_s, world
        self.next = [0] * groups  # the next entry number of each group
        self.busy: list[dict | None] = [None] * groups  # the job each group runs: {"id", "n", "cancel_sent"}
        self.closed = [False] * groups
        self.thread = threading.Thread(target=self._main, name="k5-dispatch", daemon=True)
        self.last_expiry = 0.0
        self.error: BaseException | None = None

    def start(self) -> "Dispatcher":
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join()

    def _main(self) -> None:
        try:
            self._wait_loaded()
            while self.round():
                self.board.wake.wait(ROUND_S)
                self.board.wake.clear()
        except BaseException as e:  # a broken store or database: the server cannot go on
            self.error = e
            log.error("error: the dispatcher failed: %s: %s", type(e).__name__, e)
            self.sup.fail(e)

    def _wait_loaded(self) -> None:
        while self.mailbox.add("loaded", 0) < self.world:
            if self.sup.stop_requested:
                break
            self.board.wake.wait(0.05)
        with self.board.lock:
            self.board.ready = True
        log.info("ready: the model is loaded on %d rank(s), %d group(s) serve requests", self.world, self.groups)

    def round(self) -> bool:
        """One round; False once every group is closed and idle (the server is stopping)."""
        self.collect()
        stopping = self.sup.stop_requested
        if stopping and not self.board.stopping:
            with self.board.lock:
                self.board.stopping = True
            log.info("stopping: no new requests; the running job(s) stop at their next step and stay queued")
        for g in range(self.groups):
            if self.busy[g] is not None or self.closed[g]:
                continue
            if stopping:
                self._post(g, {"close": True})
                self.closed[g] = True
                continue
            row = self.store.claim_next()
            if row is None:
                break
            self.busy[g] = {"id": row["id"], "n": self.next[g], "cancel_sent": False, "t0": time.monotonic()}
            with self.board.lock:
                self.board.progress[row["id"]] = (0, row["spec"]["request"]["steps"] + 1)
            self._post(g, {"id": row["id"], "spec": row["spec"]})
            log.info("job %s -> group %d (attempt %d)", row["id"], g, row["attempts"])
        self.pass_cancels()
        now = time.monotonic()
        if now - self.last_expiry >= EXPIRE_EVERY_S:
            self.last_expiry = now
            self.expire()
        return not (all(self.closed) and all(b is None for b in self.busy))

    def _post(self, g: int, entry: dict) -> None:
        self.mailbox.put(f"g{g}/{self.next[g]}", entry)
        self.next[g] += 1

    def collect(self) -> None:
        for g, job in enumerate(self.busy):
            if job is None:
                continue
            progress = self.mailbox.get(f"progress/{job['id']}")
            if progress is not None:
                with self.board.lock:
                    if job["id"] in self.board.progress:
                        self.board.progress[job["id"]] = tuple(progress)
            report = self.mailbox.get(f"g{g}/done{job['n']}")
            if report is None:
                continue
            self.busy[g] = None
            self.finish(job, report, time.monotonic() - job["t0"])
            for key in (f"progress/{job['id']}", f"cancel/{job['id']}", f"g{g}/done{job['n']}",
                        f"g{g}/{job['n']}"):
                self.mailbox.delete(key)

    def finish(self, job: dict, report: dict, seconds: float) -> None:
        job_id, status, board = job["id"], report["status"], self.board
        if status == "completed":
            self.store.complete(job_id, {"files": report["files"], "metrics": report["metrics"]}, self.retention_s)
            m = report["metrics"]
            with board.lock:
                board.counters["completed"] += 1
                board.step_s_sum += sum(m["step_s"])
                board.step_s_count += len(m["step_s"])
                board.forwards_run += m["dit_forwards"]["run"]
                board.forwards_skipped += m["dit_forwards"]["skipped"]
                board.job_s = board.job_s[-99:] + [seconds]
        elif status == "cancelled":
            self.store.fail(job_id, "cancelled", report["message"], self.retention_s)
            board.count("cancelled")
        else:  # stopped with the server: it runs again after the restart
            self.store.requeue(job_id, counts=False)
            board.count("requeued")
        self._peaks()
        board.settle(job_id)

    def _peaks(self) -> None:
        peaks = {r: self.mailbox.get(f"peak/{r}") for r in range(self.world)}
        with self.board.lock:
            self.board.peaks.update({r: p for r, p in peaks.items() if p is not None})

    def pass_cancels(self) -> None:
        wanted = set(self.store.cancelling()) if any(self.busy) else set()
        for job in self.busy:
            if job is not None and not job["cancel_sent"] and job["id"] in wanted:
                self.mailbox.put(f"cancel/{job['id']}", True)
                job["cancel_sent"] = True
                self.board.told_group(job["id"])
                log.info("job %s: cancel requested; its group stops at the next step", job["id"])

    def expire(self) -> None:
        for job_id in self.store.expired():
            row = self.store.get(job_id)
            if row is not None:
                remove_files(self.jobs_dir, self.uploads_dir, row)
            self.store.remove(job_id)
            log.info("job %s: expired (retention time over); its files are removed", job_id)


def remove_files(jobs_dir: Path, uploads_dir: Path, row: dict) -> None:
    """A job's folder and its upload (both named by the server, never from a request's fields)."""
    shutil.rmtree(Path(jobs_dir) / row["id"], ignore_errors=True)
    image = row["spec"]["request"].get("image")
    if image is not None and Path(image).parent == Path(uploads_dir):
        Path(image).unlink(missing_ok=True)
