"""Ending a multi-process job cleanly: the stop agreement, failure reports, and the end of a healthy run.

The complaint this answers: a rank raises, dies or hangs and the others sit in a collective until the wall-clock
limit; or a job is stopped and its ranks end with different exit codes.

- ``--timeout`` is the process group's timeout: a collective that waits longer raises (gloo) or is aborted
  (NCCL, with TORCH_NCCL_ASYNC_ERROR_HANDLING=1, which torchrun also sets).
- A rank that raises writes a failure record to the side channel (``k5.launch.channel``) and exits; every other
  rank's watchdog (``k5.launch.watchdog``) sees it within half a second and ends its rank too. Rank 0 prints the
  cause: the rank that raised, died (its heartbeat stopped) or hung (its heartbeat goes on but it never reached the
  synchronisation point where its group waited for it), before the ranks that only lost a collective.
- SIGTERM / SIGINT only set a flag (``k5.launch.signals``), which the watchdog passes to every rank. At each
  denoising step and between items the ranks that share an item agree on stopping (one all-reduce of one number:
  the highest signal any of them has seen), so they stop together and with the same signal; the item in progress
  is discarded, finished ones stay. The number lives in host memory and travels over a gloo group of the same
  ranks: over NCCL it would be a device tensor built from host data and read back with ``.item()`` at every step,
  two blocking transfers that stall the launch queue (the hosts still meet at each step, the devices never wait).
- ``finish`` waits on the store until every rank is done and then hands every rank the same account of the job
  (items finished, stop signal, each rank's report), so every rank ends with the same exit code.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from k5.launch.channel import POLL_S, ROOT_CAUSE_ORDER, Channel, classify, exception_text, explain, find_hung
from k5.launch.logs import Logs
from k5.launch.signals import EXIT_FAILED, Stopped, StopSignals, signal_name
from k5.launch.watchdog import Watchdog


def init_distributed(timeout_s: float, device: torch.device) -> None:
    # Read by the NCCL process group when it is created: a timed-out collective then tears the process down
    # instead of leaving it waiting forever. torchrun sets the same default for its workers.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def host_group(group, timeout_s: float):
    """A group of ``group``'s ranks whose collectives take host memory: ``group`` itself unless it is NCCL's, else a
    gloo twin of it. Only its members call this (use_local_synchronization), all at the same point; item groups are
    disjoint, so no two creations interleave."""
    if dist.get_backend(group) != dist.Backend.NCCL:
        return group
    return dist.new_group(dist.get_process_group_ranks(group), backend="gloo", timeout=timedelta(seconds=timeout_s),
                          use_local_synchronization=True)


@dataclass
class Outcome:
    """The job as every rank sees it once all are done."""

    items_done: int  # items finished in this run, all dp groups
    stop_signal: int | None  # the signal of a stop requested anywhere in the job, None if none was
    reports: list[dict] | None  # each rank's report (rank 0 only; None elsewhere)


class Supervisor:
    """Everything about ending a rank: the stop flag and agreement, failure reports, the watchdog."""

    def __init__(self, rank: int, world: int, timeout_s: float, logs: Logs, signals: StopSignals,
                 device: torch.device):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.logs, self.log, self.signals = logs, logs.log, signals
        self.comm_device = device if device.type == "cuda" else torch.device("cpu")
        self.group = None  # the ranks that work on the same item (set once the mesh exists); None: the world
        self.group_size = world
        self.agreement = None  # a host (gloo) group of the same ranks as ``group``, for the per-step stop agreement
        self.group_id = None  # the dp group, for the heartbeat (ranks compare progress within their group)
        self.where = "starting"
        self.sync = 0  # synchronisation points (stop agreements) the main thread has entered
        self.state = "running"
        self.item: int | None = None
        self.first_item: int | None = None
        self.peer_signal: int | None = None  # a stop another rank received (from the watchdog)
        self.agreed_signal: int | None = None  # the signal of the last agreement that said stop
        self.agreed_cancel = False  # the last agreement's: some rank of the group answered should_stop with yes
        self.items_done = 0  # this process's finished items (the job-wide count is on the store)
        self.written_note = None  # callable -> str: what the job has written so far, for the last line of a failure
        self._fatal = threading.Lock()
        self._beats = 0
        self._beat_lock = threading.Lock()
        self.channel = self.watchdog = None
        if world > 1:
            op_timeout = max(5.0, min(30.0, timeout_s / 4))
            # The main thread and the watchdog each get a store client of their own.
            self.channel = Channel(rank, world, op_timeout)
            self.publish()  # a rank that dies before the watchdog's first round still has a heartbeat to go stale
            self.watchdog = Watchdog(self, Channel(rank, world, op_timeout)).start()

    # -- heartbeats --

    def beat(self, channel: Channel, state: str | None = None) -> None:
        with self._beat_lock:
            self._beats += 1
            n = self._beats
        channel.beat({"n": n, "state": state or self.state, "where": self.where, "sync": self.sync,
                      "group": self.group_id})

    def _ch(self) -> Channel:
        """This thread's store client."""
        w = self.watchdog
        return w.channel if w is not None and threading.current_thread() is w.thread else self.channel

    def publish(self) -> None:
        """Heartbeat now from the main thread, so ``where`` reaches the others at once (a crash right after it is
        then reported at the right place)."""
        if self.channel is not None:
            try:
                self.beat(self.channel)
            except Exception:  # the watchdog reports a lost store
                pass

    def set_group(self, group, group_size: int, group_id: int) -> None:
        """Every rank of ``group`` calls this at the same point (it creates the group's host twin)."""
        self.group, self.group_size, self.group_id = group, group_size, group_id
        self.agreement = host_group(group, self.timeout_s) if group is not None and group_size > 1 else None
        self.publish()

    # -- stopping --

    @property
    def stop_requested(self) -> bool:
        return self.signals.event.is_set()

    @property
    def stop_signal(self) -> int | None:
        return self.signals.signum or self.agreed_signal or self.peer_signal

    def peer_stopped(self, signum: int | None) -> None:
        """Another rank was asked to stop (the watchdog saw its stop request)."""
        if self.peer_signal is None and self.signals.signum is None:
            self.log.info("another rank received %s; stopping at the next step", signal_name(signum))
        self.peer_signal = signum
        self.signals.event.set()

    def agree_stop(self, cancel: bool | None = None) -> bool:
        """Whether any rank of this item's group was asked to stop; every rank of the group must call this at the
        same points, so the group stops together (never leaving a peer in a collective), with the same signal.

        ``cancel``: this rank's answer to a front-end's should_stop (k5.launch.engine), agreed in the same
        collective; ``agreed_cancel`` then says whether any rank of the group said yes. None: no such question (the
        CLI), and the agreement stays one number."""
        self.sync += 1
        self.publish()
        local = (self.stop_signal or 15) if self.stop_requested else 0
        flags = [local] if cancel is None else [local, int(cancel)]
        if self.group_size > 1:
            # Before set_group (once per job, before loading) the world agrees over the default group, on its device.
            group, device = (self.agreement, "cpu") if self.agreement is not None else (self.group, self.comm_device)
            flag = torch.tensor(flags, dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            flags = [int(flag.item())] if len(flags) == 1 else [int(v) for v in flag.tolist()]
        local = flags[0]
        self.agreed_cancel = len(flags) > 1 and bool(flags[1])
        if local:
            self.agreed_signal = local
        return bool(local)

    def begin_item(self, index: int, label: str) -> None:
        self.item, self.where = index, label
        if self.first_item is None:
            self.first_item = index
        self.publish()

    def step(self, step: int) -> None:
        """After denoising step ``step`` (0-based): progress for the heartbeat, then the stop agreement."""
        self.step_done(step)
        if self.agree_stop():
            raise Stopped()

    def step_done(self, step: int) -> None:
        """This rank finished denoising step ``step`` (0-based): the heartbeat says so at once."""
        self.where = f"{self.where.split(', after step')[0]}, after step {step + 1}"
        self.publish()

    def item_done(self) -> None:
        self.items_done += 1
        if self.channel is not None:
            self.channel.counter("items_done", 1)

    # -- failing --

    def record(self, kind: str, error: str, rank: int | None = None, where: str | None = None) -> dict:
        rank = self.rank if rank is None else rank
        return {"rank": rank, "kind": kind, "error": error, "where": self.where if where is None else where,
                "host": socket.gethostname(), "pid": os.getpid() if rank == self.rank else None,
                "time": time.time(), "log": self.logs.log_file(rank)}

    def fail(self, exc: BaseException) -> None:
        """This rank raised: log the traceback, tell the others, end (rank 0 first says who failed and why)."""
        kind = classify(exc)
        self.logs.detail(f"rank {self.rank} failed at {self.where}:\n"
                         + "".join(traceback.format_exception(exc)).rstrip())
        self.fatal(self.record(kind, exception_text(exc)))

    def on_records(self, records: list[dict]) -> None:
        """The watchdog saw failure records: end this rank if another rank failed."""
        fatal = [r for r in records if (r["rank"] != self.rank or r["kind"] in ("dead", "hung"))
                 and r["kind"] in ROOT_CAUSE_ORDER]
        if fatal:
            cause = min(fatal, key=lambda r: (ROOT_CAUSE_ORDER[r["kind"]], r["time"]))
            self.fatal(reason=f"rank {cause['rank']} failed: {cause['error']}")

    def fatal(self, own: dict | None = None, reason: str = "") -> None:
        """End this rank now with EXIT_FAILED (any thread). Idempotent: the first caller wins, others return."""
        if not self._fatal.acquire(blocking=False):
            if threading.current_thread() is threading.main_thread():
                threading.Event().wait()  # the watchdog is already ending the process
            return
        try:
            if own is not None and self.channel is not None:
                try:
                    self._ch().report(own)
                except Exception as e:
                    self.log.error("could not report the failure to the other ranks: %s", e)
            if self.rank == 0:
                self.log.error(self._explain(own))
                if self.written_note is not None:
                    self.log.error(self.written_note())
            elif reason:
                self.log.error("rank %d stopping: %s", self.rank, reason)
        finally:
            if self.channel is not None:
                try:  # tells rank 0 this rank left because of the failure, not silently before it
                    self.beat(self._ch(), state="exited")
                except Exception:
                    pass
            self.logs.flush()
            # No destroy_process_group: tearing down a group whose peer is gone can itself hang.
            os._exit(EXIT_FAILED)

    def _explain(self, own: dict | None) -> str:
        records = [] if own is None else [own]
        if self.channel is not None:
            try:
                records = self._gather_cause(own)
            except Exception as e:  # the store went with the failure: say what this rank knows
                self.log.error("(could not read the other ranks' reports: %s)", e)
        return explain(records)

    def _gather_cause(self, own: dict | None) -> list[dict]:
        """The reports, looking a little longer when they hold only consequences (collectives that lost a peer):
        a rank whose heartbeat stopped died; a rank whose heartbeat goes on but that stayed behind its group's
        synchronisation count hung. Bounded by about two seconds, so the job still ends within the timeout plus a
        few seconds."""
        ch = self._ch()
        start = time.monotonic()
        first = ch.heartbeats()
        while True:
            records = ch.records()
            if own is not None and not any(r["rank"] == own["rank"] for r in records):
                records.append(own)
            if any(r["kind"] in ("error", "dead") for r in records):
                return records
            now = time.monotonic()
            current = ch.heartbeats()
            # A straggler that already left because of this failure was alive: it hung, no need to watch longer.
            hung = [r for r in find_hung(current) if current[r]["state"] == "exited"]
            if hung:
                return records + [self._hung(r, current[r]) for r in hung]
            if now - start >= 3 * POLL_S:
                dead = [r for r, hb in first.items() if r != self.rank and hb is not None
                        and current.get(r) is not None and current[r]["state"] == "running"
                        and current[r]["n"] == hb["n"]]
                if dead:
                    return records + [self.record("dead", "stopped without a report (killed by a signal or out of "
                                                          "memory?)", rank=r, where=current[r]["where"])
                                      for r in dead]
                hung = find_hung(current)
                if hung:
                    return records + [self._hung(r, current[r]) for r in hung]
                if now - start >= 6 * POLL_S:  # nobody failed outright: a collective timed out on a live rank
                    return records + [{"rank": r, "kind": "alive", "where": hb["where"], "time": now, "error": ""}
                                      for r, hb in sorted(current.items()) if hb is not None
                                      and hb["state"] == "running"]
            time.sleep(POLL_S)

    def _hung(self, rank: int, heartbeat: dict) -> dict:
        return self.record("hung", f"it never reached the next step's synchronisation, where the other rank(s) of "
                                   f"its group waited for it longer than --timeout {self.timeout_s:g} s", rank=rank,
                           where=heartbeat["where"])

    def job_items_done(self) -> int:
        """Items finished in this run by every dp group so far (this process's count if the store is gone)."""
        try:
            return self._ch().counter("items_done") if self.channel is not None else self.items_done
        except Exception:
            return self.items_done

    # -- the end of a run --

    def finish(self, report: dict | None = None) -> Outcome:
        """Wait (on the store, without a collective timeout) until every rank is done; return the job's account.

        ``report`` is this rank's contribution to the run's summary (metrics); rank 0 gets every rank's."""
        if self.channel is None:
            return Outcome(self.items_done, self.stop_signal if self.stop_requested else None, [report or {}])
        self.where = "finished"
        self.publish()
        if self.signals.signum is not None:  # the watchdog may not have passed it on yet: the account must have it
            self.channel.request_stop(self.signals.signum)
        self.channel.put(f"report/rank{self.rank}", report or {})
        self.channel.counter("finished", 1)
        while self.channel.counter("finished") < self.world:
            if self._fatal.locked():
                threading.Event().wait()
            time.sleep(POLL_S / 2)
        # Everyone is here: nothing changes any more, so every rank reads the same account.
        outcome = Outcome(self.channel.counter("items_done"), self.channel.stop_signal() or self.agreed_signal,
                          [self.channel.poll(f"report/rank{r}") for r in range(self.world)] if self.rank == 0
                          else None)
        self.state = "finished"  # neighbours stop watching this heartbeat
        self.watchdog.stop()
        self.beat(self.channel)
        # Nobody leaves before every watchdog has stopped: rank 0 may host the store the others poll.
        dist.barrier()
        return outcome

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
