"""The server's job store: one SQLite database in the state folder, the jobs' files beside it.

A request is accepted only once its row is committed (WAL journal, ``synchronous=FULL`` for that commit: it is on
disk when the client gets its id), so a crash right after the answer loses nothing. The other transitions commit
with ``synchronous=NORMAL`` (safe from any process crash; a power loss may undo the last of them, which a restart
handles like a crash: a job back to queued runs again, a completed one is found by its record). A row goes

    queued -> in_progress -> completed | failed          (DELETE of a queued job removes its row)
                  |
                  +-> queued   (the server stopped or a rank failed while it ran: it runs again)

and every transition is one transaction. What the job wrote lives in its folder (``jobs/<id>/``, written by the
CLI's write-check-publish path with its manifest record); the row keeps the same file entries (name, bytes,
sha256) once the job is completed. Progress is not stored: it changes every step and means nothing after a restart.

The queue is bounded (``max_queue`` rows waiting, the running ones not counted) and ordered by priority (higher
first), then by arrival (``seq``): FIFO within a priority.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

STATUSES = ("queued", "in_progress", "completed", "failed")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    id TEXT UNIQUE NOT NULL,                -- made by the server
    kind TEXT NOT NULL,                     -- video | image
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    expires_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,    -- how many times a run of it started
    cancel INTEGER NOT NULL DEFAULT 0,      -- DELETE asked to stop it while it ran
    spec TEXT NOT NULL,                     -- the checked request (JSON), what every rank runs
    error TEXT,                             -- JSON {code, message}
    result TEXT                             -- JSON: files, timings, DiT forwards of a completed job
);
CREATE INDEX IF NOT EXISTS waiting ON jobs (status, priority DESC, seq);
"""


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting jobs; the request is not accepted."""


class JobStore:
    """Every call is one transaction on one connection, serialised by a lock (the HTTP handlers' threads and the
    dispatcher share it; SQLite's own locking then only guards against another process, which the state folder's
    lock already keeps out)."""

    def __init__(self, path: Path, max_queue: int):
        self.path, self.max_queue = Path(path), max_queue
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.lock = threading.Lock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _tx(self, fn, durable: bool = False):
        """``fn(db)`` in one transaction; ``durable``: on disk (fsync'ed) when this returns."""
        with self.lock:
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return out

    # ---- accepting ----------------------------------------------------------------------------------------------

    def add(self, job_id: str, kind: str, spec: dict, priority: int = 0, now: float | None = None) -> dict:
        """Commit a new queued job, or raise QueueFull; returns its row."""
        return self.add_many([(job_id, kind, spec, priority)], now)[0]

    def add_many(self, jobs: list[tuple[str, str, dict, int]], now: float | None = None) -> list[dict]:
        """Commit every (id, kind, spec, priority) as a queued job, or none of them (QueueFull when they do not all
        fit); returns their rows."""
        now = int(time.time() if now is None else now)

        def add(db):
            waiting = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue is full ({waiting} job(s) waiting, --max-queue {self.max_queue})")
            for job_id, kind, spec, priority in jobs:
                db.execute("INSERT INTO jobs (id, kind, status, priority, created_at, spec) VALUES "
                           "(?, ?, 'queued', ?, ?, ?)", (job_id, kind, priority, now, json.dumps(spec)))
            return [row(db, job_id) for job_id, *_ in jobs]

        return self._tx(add, durable=True)  # the client hears "accepted" only once the rows are on disk

    # ---- reading ------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            return row(self.db, job_id)

    def list(self, kind: str | None = None, after: str | None = None, limit: int = 20,
             order: str = "desc") -> list[dict]:
        """Jobs in arrival order (``desc``: newest first), after the job ``after`` (a cursor, as OpenAI's lists)."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        with self.lock:
            if after is not None:
                cursor = self.db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    raise KeyError(after)
                where.append(f"seq {op} ?")
                args.append(cursor[0])
            sql = ("SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
                   + f" ORDER BY seq {direction} LIMIT ?")
            return [decode(r) for r in self.db.execute(sql, (*args, limit)).fetchall()]

    def counts(self) -> dict[str, int]:
        with self.lock:
            found = dict(self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        return {s: found.get(s, 0) for s in STATUSES}

    def position(self, job_id: str) -> int | None:
        """How many queued jobs run before this queued one (0: it is next)."""
        with self.lock:
            me = self.db.execute("SELECT priority, seq, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if me is None or me["status"] != "queued":
                return None
            ahead = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority > ? OR "
                                    "(priority = ? AND seq < ?))", (me["priority"], me["priority"], me["seq"]))
            return ahead.fetchone()[0]

    # ---- running ------------------------------------------------------------------------------------------------

    def claim_next(self, now: float | None = None) -> dict | None:
        """The next queued job, now in progress (one more attempt), or None when none waits."""
        now = int(time.time() if now is None else now)

        def claim(db):
            r = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq LIMIT 1").fetchone()
            if r is None:
                return None
            db.execute("UPDATE jobs SET status = 'in_progress', attempts = attempts + 1, started_at = ? WHERE id = ?",
                       (now, r["id"]))
            return row(db, r["id"])

        return self._tx(claim)

    def complete(self, job_id: str, result: dict, retention_s: float | None, now: float | None = None) -> None:
        now = int(time.time() if now is None else now)
        expires = None if retention_s is None else int(now + retention_s)
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET status = 'completed', completed_at = ?, expires_at = ?, result = ?, error = NULL "
            "WHERE id = ?", (now, expires, json.dumps(result), job_id)))

    def fail(self, job_id: str, code: str, message: str, retention_s: float | None, now: float | None = None) -> None:
        now = int(time.time() if now is None else now)
        expires = None if retention_s is None else int(now + retention_s)
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET status = 'failed', completed_at = ?, expires_at = ?, error = ? WHERE id = ?",
            (now, expires, json.dumps({"code": code, "message": message}), job_id)))

    def requeue(self, job_id: str, code: str | None = None, message: str | None = None,
                counts: bool = True) -> None:
        """Back in the queue at its old place (its seq); ``code``/``message``: why its last run did not finish.
        ``counts=False``: the run was stopped cleanly (SIGTERM) and does not count against --max-attempts."""
        error = None if code is None else json.dumps({"code": code, "message": message})
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET status = 'queued', started_at = NULL, error = COALESCE(?, error), "
            "attempts = attempts - ? WHERE id = ? AND status = 'in_progress'", (error, 0 if counts else 1, job_id)))

    def request_cancel(self, job_id: str) -> str | None:
        """DELETE: a queued job's row is removed ('removed'); a running one is marked to stop ('cancelling');
        a finished one is removed with its files by the caller ('finished'). None: no such job."""

        def cancel(db):
            r = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if r is None:
                return None
            if r["status"] == "queued":
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                return "removed"
            if r["status"] == "in_progress":
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
                return "cancelling"
            return "finished"

        return self._tx(cancel)

    def cancelling(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT id FROM jobs WHERE status = 'in_progress' AND cancel = 1")]

    def remove(self, job_id: str) -> bool:
        return self._tx(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0)

    def in_progress(self) -> list[dict]:
        with self.lock:
            return [decode(r) for r in self.db.execute("SELECT * FROM jobs WHERE status = 'in_progress' ORDER BY seq")]

    def expired(self, now: float | None = None) -> list[str]:
        now = int(time.time() if now is None else now)
        with self.lock:
            return [r[0] for r in self.db.execute(
                "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? AND status IN "
                "('completed', 'failed')", (now,))]


def row(db, job_id: str) -> dict | None:
    r = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if r is None else decode(r)


def decode(r: sqlite3.Row) -> dict:
    out = dict(r)
    for key in ("spec", "error", "result"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out
