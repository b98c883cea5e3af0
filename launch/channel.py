"""The side channel of a multi-process job: small keys on the rendezvous TCPStore, and what rank 0 makes of them.

Collectives cannot say why they failed, and a rank that is stuck or dead cannot say anything. The store (the one
torchrun's agent, or rank 0 without torchrun, already runs for the rendezvous) carries what they cannot:

- ``failure/rank<r>``: a rank that raises writes which rank, what and where before it exits;
- ``hb/<r>``: each rank's heartbeat (written by its watchdog thread) with where its main thread is and how many
  synchronisation points it has passed (``sync``): a rank whose heartbeat stops has died, a rank whose heartbeat
  goes on while its ``sync`` stays behind the rest of its group is stuck;
- ``stop/rank<r>``: a rank that got SIGTERM / SIGINT says so at once, so every rank stops at its next safe point;
- counters (finished items, ranks done) and the plan rank 0 makes at the start of a job.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from datetime import timedelta

import torch.distributed as dist

POLL_S = 0.5  # how often the watchdog looks at the store

# ---- failure records ------------------------------------------------------------------------------------------------

_COMM = re.compile(r"gloo|nccl|connection (closed|reset|refused)|timed? ?out|broken pipe|peer", re.IGNORECASE)

# The order in which rank 0 looks for the cause: a rank that raised explains everything after it; a rank that died
# or hung explains the collectives that timed out waiting for it.
ROOT_CAUSE_ORDER = {"error": 0, "dead": 1, "hung": 2, "store": 3, "comm": 4}
_VERB = {"dead": "died", "hung": "hung", "comm": "lost a collective", "store": "lost the coordination store"}


def classify(exc: BaseException) -> str:
    """'comm' for errors a collective raised because some other rank went away or stalled, else 'error'."""
    if isinstance(exc, getattr(dist, "DistError", ())) or _COMM.search(f"{type(exc).__name__} {exc}"):
        return "comm"
    return "error"


def exception_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


def dead_after(timeout_s: float) -> float:
    """Seconds of heartbeat silence after which a rank is reported dead: half the timeout, so that everyone still
    ends within it. Generous on purpose: collectives notice a dead peer sooner; this only names it and stops the
    ranks that share no collective with it."""
    return max(2.0, timeout_s / 2)


def find_hung(heartbeats: dict[int, dict | None]) -> list[int]:
    """The ranks that the rest of their group waits for: fewer synchronisation points passed than the group's most
    advanced rank (ranks that finished are left out; a rank that exited because of the failure keeps its count).

    The ranks of one group meet at every synchronisation point (each denoising step's stop agreement), so when one
    of them times out waiting there, a member still below that count never arrived: it is stuck before it (in a
    computation, a file, a deadlock), not waiting like the others."""
    groups = defaultdict(list)
    for rank, hb in heartbeats.items():
        if hb is not None and hb.get("state") != "finished" and hb.get("sync") is not None:
            groups[hb.get("group")].append((rank, hb["sync"]))
    hung = []
    for members in groups.values():
        top = max(sync for _, sync in members)
        hung += [rank for rank, sync in members if sync < top]
    return sorted(hung)


def explain(records: list[dict]) -> str:
    """Rank 0's message: the failing rank and why first, the ranks that stopped because of it after."""
    fatal = [r for r in records if r["kind"] in ROOT_CAUSE_ORDER]
    if not fatal:
        return "error: the job failed without a report from any rank"
    fatal.sort(key=lambda r: (ROOT_CAUSE_ORDER[r["kind"]], r["time"]))
    cause = fatal[0]
    where = f" at {cause['where']}" if cause.get("where") else ""
    lines = [f"error: rank {cause['rank']} {_VERB.get(cause['kind'], 'failed')}{where}: {cause['error']}"]
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


# ---- the store ------------------------------------------------------------------------------------------------------

class Channel:
    """Keys on the rendezvous TCPStore, through a client of this process's own (the watchdog thread has another one,
    so it can use the store while the main thread is in the middle of a call)."""

    def __init__(self, rank: int, world: int, op_timeout_s: float):
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=op_timeout_s),
                              wait_for_workers=False)
        # A torchrun restart reuses the agent's store: keep each attempt's keys apart.
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"k5/{run[0]}/{run[1]}/", store)
        self.rank, self.world, self.address = rank, world, f"{host}:{port}"

    def _get(self, key: str):
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    # failures
    def report(self, record: dict) -> None:
        key = f"failure/rank{record['rank']}"
        if record["kind"] in ("dead", "hung") and self.store.check([key]):
            return  # the rank said why itself
        self.store.set(key, json.dumps(record))
        self.store.add("failures", 1)

    def failure_count(self) -> int:
        return self.store.add("failures", 0)

    def records(self) -> list[dict]:
        return [r for r in (self._get(f"failure/rank{rank}") for rank in range(self.world)) if r is not None]

    # heartbeats
    def beat(self, beat: dict) -> None:
        self.store.set(f"hb/{self.rank}", json.dumps(beat))

    def heartbeat(self, rank: int) -> dict | None:
        return self._get(f"hb/{rank}")

    def heartbeats(self) -> dict[int, dict | None]:
        return {rank: self.heartbeat(rank) for rank in range(self.world)}

    # stops
    def request_stop(self, signum: int) -> None:
        self.store.set(f"stop/rank{self.rank}", str(signum))
        self.store.add("stops", 1)

    def stop_count(self) -> int:
        return self.store.add("stops", 0)

    def stop_signal(self) -> int | None:
        """The signal of the stop requests so far (SIGTERM over SIGINT when both came), None without any."""
        found = [int(self.store.get(k)) for k in (f"stop/rank{r}" for r in range(self.world))
                 if self.store.check([k])]
        return max(found) if found else None

    # plain values
    def counter(self, name: str, add: int = 0) -> int:
        return self.store.add(name, add)

    def put(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value))

    def poll(self, key: str):
        return self._get(key)
