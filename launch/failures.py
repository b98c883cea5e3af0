"""Ending a multi-process job cleanly: signals, collective timeouts, a failing or dying rank, per-rank logs.

The complaint this answers: a rank raises or dies and the others sit in a collective until the wall-clock limit.

- ``--timeout`` is the process group's timeout: a collective that waits longer raises (gloo) or is aborted
  (NCCL, with TORCH_NCCL_ASYNC_ERROR_HANDLING=1, which torchrun also sets).
- A side channel on the rendezvous TCPStore (the one torchrun's agent, or rank 0 without torchrun, already runs)
  carries what collectives cannot: a rank that fails writes ``failure/rank<r>`` (kind, error, where, log) before it
  exits. Every rank runs a watchdog thread that polls the channel twice a second; a failure record anywhere ends
  the rank at once, even when it is busy with its own items and in no collective with the failed rank (data
  parallel). Rank 0 prints which rank failed and why.
- Heartbeats name ranks that die without a word (SIGKILL, the OOM killer): each rank watches the next one's
  heartbeat and reports it dead after ``timeout / 2`` seconds of silence, so everyone still ends within the timeout.
- SIGTERM (Slurm preemption, torchrun forwarding it) and SIGINT only set a flag. At each denoising step and between
  items the ranks that work on one item agree (one all-reduce of one number) and stop together: the current item
  is discarded, finished ones stay, the exit code is 128 + signal (143 for SIGTERM). A second SIGINT ends at once.
- Per-rank logs: ``DIR/logs/rank<r>.log``. Ranks other than 0 send everything (Python warnings, C++ messages,
  tracebacks) to their log only, so the terminal shows rank 0.

Test hook (not for production): ``K5_TEST_FAIL="rank=1,item=0,step=1,mode=raise"`` makes that rank raise right
after denoising step 1 (1-based) of that item (item = the index in the prompt file; default: the rank's first
item). ``mode=kill`` SIGKILLs the rank instead (a crash without a word), ``mode=hang`` blocks it forever (a stuck
rank).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_FAILED = 1
EXIT_USAGE = 2
POLL_S = 0.5
LOGGER = "k5.launch"
TEST_HOOK = "K5_TEST_FAIL"


class Stopped(Exception):
    """The job was asked to stop (SIGTERM / SIGINT); the current item is discarded."""


# ---- process group ----------------------------------------------------------------------------------------------

def init_distributed(timeout_s: float, device: torch.device) -> None:
    # Read by the NCCL process group when it is created: a timed-out collective then tears the process down
    # instead of leaving it waiting forever. torchrun sets the same default for its workers.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def dead_after(timeout_s: float) -> float:
    """Seconds of heartbeat silence after which a rank is reported dead: half the timeout, so that everyone still
    ends within it. Generous on purpose: collectives notice a dead peer sooner; this only names it and stops the
    ranks that share no collective with it."""
    return max(2.0, timeout_s / 2)


# ---- logs -------------------------------------------------------------------------------------------------------

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

    Without a log dir (a single video written to explicit paths) ranks other than 0 show only errors, prefixed.
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


# ---- signals ----------------------------------------------------------------------------------------------------

class StopSignals:
    """SIGTERM / SIGINT set a flag that the work loop reads at safe points; nothing is interrupted half-way."""

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
            os._exit(128 + signum)  # Ctrl-C twice: the user wants out now
        if self.signum is None:
            self.signum = signum
        self.event.set()

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a peer's stop"


# ---- the test hook ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Injection:
    rank: int
    item: int | None
    step: int
    mode: str

    @classmethod
    def from_env(cls) -> "Injection | None":
        spec = os.environ.get(TEST_HOOK)
        if not spec:
            return None
        try:
            kv = dict(part.split("=", 1) for part in spec.split(","))
            item = kv.get("item")
            inj = cls(int(kv["rank"]), None if item is None else int(item), int(kv.get("step", 1)),
                      kv.get("mode", "raise"))
        except (ValueError, KeyError):
            raise ValueError(f"{TEST_HOOK}={spec!r} must look like rank=1,item=0,step=1,mode=raise") from None
        if inj.mode not in ("raise", "kill", "hang"):
            raise ValueError(f"{TEST_HOOK} mode must be raise, kill or hang, got {inj.mode!r}")
        return inj

    def fire(self, rank: int, item: int, first_item: int, step: int) -> None:
        if rank != self.rank or step != self.step or item != (first_item if self.item is None else self.item):
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hang":
            threading.Event().wait()
        raise RuntimeError(f"injected failure ({TEST_HOOK}) at rank {rank}, item {item}, after step {step}")


# ---- failure records ------------------------------------------------------------------------------------------------

_COMM = re.compile(r"gloo|nccl|connection (closed|reset|refused)|timed? ?out|broken pipe|peer", re.IGNORECASE)


def classify(exc: BaseException) -> str:
    """'comm' for errors a collective raised because some other rank went away or stalled, else 'error'."""
    if isinstance(exc, getattr(dist, "DistError", ())) or _COMM.search(f"{type(exc).__name__} {exc}"):
        return "comm"
    return "error"


def exception_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


ROOT_CAUSE_ORDER = {"error": 0, "dead": 1, "store": 2, "comm": 3}


def explain(records: list[dict]) -> str:
    """Rank 0's message: the failing rank and why first, the ranks that stopped because of it after."""
    fatal = [r for r in records if r["kind"] in ROOT_CAUSE_ORDER]
    if not fatal:
        return "error: the job failed without a report from any rank"
    fatal.sort(key=lambda r: (ROOT_CAUSE_ORDER[r["kind"]], r["time"]))
    cause = fatal[0]
    where = f" at {cause['where']}" if cause.get("where") else ""
    verb = {"dead": "died", "comm": "lost a collective", "store": "lost the coordination store"}.get(
        cause["kind"], "failed")
    lines = [f"error: rank {cause['rank']} {verb}{where}: {cause['error']}"]
    if cause.get("log"):
        lines.append(f"  its log: {cause['log']}")
    others = [r for r in fatal[1:] if r["rank"] != cause["rank"]]
    if others:
        lines.append("  then: " + "; ".join(f"rank {r['rank']}: {r['error'][:160]}" for r in others))
    alive = [r for r in records if r["kind"] == "alive"]
    if alive:  # a timeout without a culprit: where the others were helps to find the one that stopped
        lines.append("  alive when it failed: " +
                     "; ".join(f"rank {r['rank']} at {r['where']}" for r in alive))
    return "\n".join(lines)


# ---- the side channel and the watchdog -------------------------------------------------------------------------------

class Channel:
    """Keys on the rendezvous TCPStore, through a client of this process's own (the watchdog thread uses it while
    the main thread runs collectives)."""

    def __init__(self, rank: int, world: int, op_timeout_s: float):
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=op_timeout_s),
                              wait_for_workers=False)
        # A torchrun restart reuses the agent's store: keep each attempt's keys apart.
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"k5/{run[0]}/{run[1]}/", store)
        self.rank, self.world, self.address = rank, world, f"{host}:{port}"

    def report(self, record: dict) -> None:
        key = f"failure/rank{record['rank']}"
        if record["kind"] == "dead" and self.store.check([key]):
            return  # the rank said why before it went
        self.store.set(key, json.dumps(record))
        self.store.add("failures", 1)

    def failure_count(self) -> int:
        return self.store.add("failures", 0)

    def records(self) -> list[dict]:
        keys = [f"failure/rank{r}" for r in range(self.world)]
        return [json.loads(self.store.get(k)) for k in keys if self.store.check([k])]

    def beat(self, n: int, state: str, where: str) -> None:
        self.store.set(f"hb/{self.rank}", json.dumps({"n": n, "state": state, "where": where}))

    def heartbeat(self, rank: int) -> dict | None:
        key = f"hb/{rank}"
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def counter(self, name: str, add: int = 0) -> int:
        return self.store.add(name, add)

    def put(self, key: str, value: dict) -> None:
        self.store.set(key, json.dumps(value))

    def poll(self, key: str) -> dict | None:
        return json.loads(self.store.get(key)) if self.store.check([key]) else None


class Supervisor:
    """Everything about ending a rank: the stop flag, the agreement on stopping, failure reports, the watchdog."""

    def __init__(self, rank: int, world: int, timeout_s: float, logs: Logs, signals: StopSignals,
                 device: torch.device):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.logs, self.log, self.signals = logs, logs.log, signals
        self.comm_device = device if device.type == "cuda" else torch.device("cpu")
        self.group = None  # the ranks that work on the same item (set once the mesh exists)
        self.group_size = 1
        self.where = "starting"
        self.peer_stop = False
        self.injection = Injection.from_env()
        self.item: int | None = None
        self.first_item: int | None = None
        self.state = "running"
        self.on_items_done = None  # rank 0: callback(total finished items), fed by the watchdog
        self._fatal = threading.Lock()
        self._quit = threading.Event()
        self._beats = 0
        self._beat_lock = threading.Lock()
        self.channel = self._watch_channel = self.thread = None
        if world > 1:
            op_timeout = max(5.0, min(30.0, timeout_s / 4))
            # The main thread and the watchdog each get a store client of their own.
            self.channel = Channel(rank, world, op_timeout)
            self._watch_channel = Channel(rank, world, op_timeout)
            self.publish()  # a rank that dies before the watchdog's first round still has a heartbeat to go stale
            self.thread = threading.Thread(target=self._watch, name="k5-watchdog", daemon=True)
            self.thread.start()

    def _beat(self, channel: "Channel", state: str | None = None) -> None:
        with self._beat_lock:
            self._beats += 1
            n = self._beats
        channel.beat(n, state or self.state, self.where)

    def _ch(self) -> "Channel":
        """This thread's store client."""
        return self._watch_channel if threading.current_thread() is self.thread else self.channel

    def publish(self) -> None:
        """Heartbeat now from the main thread, so ``where`` reaches the others at once (a crash right after it is
        then reported at the right place)."""
        if self.channel is not None:
            try:
                self._beat(self.channel)
            except Exception:  # the watchdog reports a lost store
                pass

    # -- stopping (signals) --

    @property
    def stop_requested(self) -> bool:
        return self.signals.event.is_set() or self.peer_stop

    def agree_stop(self) -> bool:
        """Whether any rank of this item's group was asked to stop; every rank of the group must call this at the
        same points (the group then stops together instead of leaving a peer in a collective)."""
        if self.group_size == 1:
            return self.stop_requested
        flag = torch.tensor([int(self.stop_requested)], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def begin_item(self, index: int, label: str) -> None:
        self.item, self.where = index, label
        if self.first_item is None:
            self.first_item = index
        self.publish()

    def step(self, step: int) -> None:
        """After denoising step ``step`` (0-based): progress for the heartbeat, the test hook, the stop agreement."""
        self.where = f"{self.where.split(', after step')[0]}, after step {step + 1}"
        self.publish()
        if self.injection is not None:
            self.injection.fire(self.rank, self.item, self.first_item, step + 1)
        if self.agree_stop():
            raise Stopped()

    def stopped(self) -> int:
        """Tell the other dp groups to stop too, and return this rank's exit code."""
        if self.channel is not None:
            try:
                self.channel.report(self._record("stop", f"stopped by {self.signals.name}"))
            except Exception:  # the store may be gone with the launcher; the exit code still says it
                pass
        return self.signals.exit_code if self.signals.signum else 128 + signal.SIGTERM

    # -- failing --

    def _record(self, kind: str, error: str, rank: int | None = None, where: str | None = None) -> dict:
        rank = self.rank if rank is None else rank
        log = None if self.logs.log_dir is None else str(Path(self.logs.log_dir) / f"rank{rank}.log")
        return {"rank": rank, "kind": kind, "error": error, "where": self.where if where is None else where,
                "host": socket.gethostname(), "pid": os.getpid() if rank == self.rank else None,
                "time": time.time(), "log": log}

    def fail(self, exc: BaseException) -> None:
        """This rank raised: log the traceback, tell the others, end (rank 0 first says who failed and why)."""
        kind = classify(exc)
        self.logs.detail(f"rank {self.rank} failed at {self.where}:\n"
                         + "".join(traceback.format_exception(exc)).rstrip())
        self.fatal(self._record(kind, exception_text(exc)))

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
            elif reason:
                self.log.error("rank %d stopping: %s", self.rank, reason)
        finally:
            if self.channel is not None:
                try:  # tells rank 0 this rank left because of the failure, not silently before it
                    self._ch().beat(-1, "exited", self.where)
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
        """The reports, waiting briefly when they hold only consequences (a collective that lost its peer): a rank
        that died without a word is recognised by a heartbeat that neither advances nor says it exited."""
        start = time.monotonic()
        deadline = start + min(dead_after(self.timeout_s), 0.75 * self.timeout_s)
        first = {r: self._ch().heartbeat(r) for r in range(self.world) if r != self.rank}
        while True:
            records = self._ch().records()
            if own is not None and not any(r["rank"] == own["rank"] for r in records):
                records.append(own)
            if any(r["kind"] in ("error", "dead") for r in records):
                return records
            now = time.monotonic()
            if now - start >= 3 * POLL_S:
                silent = []
                for r, hb in first.items():
                    cur = self._ch().heartbeat(r)
                    if hb is not None and cur is not None and cur["state"] == "running" and cur["n"] == hb["n"]:
                        silent.append(self._record("dead", "stopped without a report (killed by a signal or out "
                                                           "of memory?)", rank=r, where=cur["where"]))
                if silent or now > deadline:
                    if not silent:  # nobody failed outright: a collective timed out on a rank that was alive
                        records += [{"rank": r, "kind": "alive", "where": hb["where"], "time": now, "error": ""}
                                    for r, hb in sorted(first.items()) if hb is not None and hb["state"] == "running"]
                    return records + silent
            time.sleep(POLL_S)

    # -- the watchdog thread --

    def _watch(self) -> None:
        channel = self._watch_channel
        seen, errors = 0, 0
        neighbour = (self.rank + 1) % self.world
        last_n, last_change = None, time.monotonic()
        silence = dead_after(self.timeout_s)
        while not self._quit.wait(POLL_S):
            try:
                self._beat(channel)
                count = channel.failure_count()
                if count > seen:
                    seen = count
                    self._on_records(channel.records())
                if self.on_items_done is not None:
                    self.on_items_done(channel.counter("items_done"))
                hb = channel.heartbeat(neighbour)
                if hb is not None and hb["state"] == "running":
                    now = time.monotonic()
                    if hb["n"] != last_n:
                        last_n, last_change = hb["n"], now
                    elif now - last_change > silence:
                        self.log.error("rank %d sent no heartbeat for %.0f s", neighbour, now - last_change)
                        channel.report(self._record(
                            "dead", f"no heartbeat for {now - last_change:.0f} s (killed by a signal or out of "
                            f"memory?)", rank=neighbour, where=hb["where"]))
                        continue  # the record comes back through failure_count on the next round
                errors = 0
            except Exception as e:
                errors += 1
                if errors * POLL_S >= max(3.0, min(10.0, self.timeout_s / 4)):
                    self.fatal(self._record("store", f"lost the coordination store at {channel.address} "
                                                     f"({type(e).__name__}: {e}); the launcher or rank 0 is gone"),
                               reason="lost the coordination store")

    def _on_records(self, records: list[dict]) -> None:
        others = [r for r in records if r["rank"] != self.rank or r["kind"] == "dead"]
        fatal = [r for r in others if r["kind"] in ROOT_CAUSE_ORDER]
        if fatal:
            cause = min(fatal, key=lambda r: (ROOT_CAUSE_ORDER[r["kind"]], r["time"]))
            self.fatal(reason=f"rank {cause['rank']} failed: {cause['error']}")
        elif others and not self.peer_stop:
            self.peer_stop = True
            self.log.info("rank %d stopped (%s); stopping after this step", others[0]["rank"], others[0]["error"])

    # -- the end of a healthy run --

    def finish(self) -> None:
        """Wait (on the store, without a collective timeout) until every rank is done, then stop the watchdog."""
        if self.channel is None:
            return
        self.where = "finished"
        self.channel.counter("finished", 1)
        while self.channel.counter("finished") < self.world:
            if self._fatal.locked():
                threading.Event().wait()
            time.sleep(POLL_S / 2)
        self.state = "finished"  # neighbours stop watching this heartbeat
        self._quit.set()
        self.thread.join()
        self.channel.beat(-1, "finished", "finished")
        # Nobody leaves before every watchdog has stopped: rank 0 may host the store the others poll.
        dist.barrier()

    def close(self) -> None:
        self._quit.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=2 * POLL_S)
