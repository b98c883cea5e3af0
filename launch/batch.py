"""Batch jobs: one output directory per job, a manifest of finished items, resume, items dealt to dp groups.

The output directory of a job::

    00000.mp4, cat.mp4, ...     finished videos (NAME.safetensors: their latents, with --save-latents)
    manifest.jsonl              one record per finished item
    expansions.jsonl            with prompt expansion: every expansion generated, kept so a resumed job reuses it
    logs/rank<r>.log            per-rank logs
    .k5-job.lock                held by rank 0 while the job runs: a second job on the same directory is refused
    .<name>.<random>.partial    temporary files; those of a killed run are deleted when the job starts again

An item is finished when, and only when, the manifest has its record and its files match the record's sizes and
sha256. The order of writing makes that exact: the files are written under temporary names, checked (a video must
decode to the frames written), fsync'ed, hashed and linked to their final names, and only then is the record
appended. Whatever a kill leaves (a temporary file, a
published file without a record, a record cut short) is therefore not finished, and the next start deletes it and
redoes the item; finished files are never touched.

Several dp groups finish items at the same time, so several processes append to one manifest. Each record is one
line written by one write() on an O_APPEND descriptor, which the kernel appends whole (local disks, Lustre, GPFS).
Every record also carries the sha256 of its own text, so a line damaged anyway (NFS, which ignores O_APPEND across
machines, or a crash in the middle of a write) is recognised, dropped and its item redone, never half-trusted.
The start of a job rewrites the manifest without such lines, so each item is recorded exactly once.

Items are dealt to dp groups by their index in the prompt file: item i goes to group i % dp. The deal depends only
on the file and the dp degree, so a resumed job hands every remaining item to the group it would have gone to.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from k5.launch.logs import LOGGER
from k5.launch.outputs import (append_line, check_output, clean_partials, media_kind, replace_atomically, sha256_file,
                              write_outputs)
from k5.launch.prompts import Item

MANIFEST = "manifest.jsonl"
EXPANSIONS = "expansions.jsonl"  # sealed lines {"key", "expanded", "output"}: expansions a resumed job reuses
METRICS = "metrics.json"  # the latest run's summary (k5.launch.metrics)
LOCK = ".k5-job.lock"
log = logging.getLogger(LOGGER)


# ---- records ------------------------------------------------------------------------------------------------------

def seal(record: dict) -> str:
    """The record as one JSON line carrying the sha256 of its own content."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False)
    return json.dumps({**body, "record_sha256": hashlib.sha256(text.encode()).hexdigest()}, sort_keys=True,
                      ensure_ascii=False)


def is_sealed(record: dict) -> bool:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False)
    return record.get("record_sha256") == hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ManifestState:
    records: list[dict] = field(default_factory=list)  # intact records, in file order
    damaged: list[int] = field(default_factory=list)  # line numbers of lines that are not intact records
    exists: bool = False
    ends_with_newline: bool = True


def read_manifest(path: Path) -> ManifestState:
    if not path.exists():
        return ManifestState()
    data = path.read_bytes()
    state = ManifestState(exists=True, ends_with_newline=not data or data.endswith(b"\n"))
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and is_sealed(record)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if ok:
            state.records.append(record)
        else:
            state.damaged.append(n)
    return state


def settings(item: Item, job: dict) -> dict:
    """Everything that decides an item's output files; a resumed job must ask for the same. LoRA adapters count by
    content and scale (a moved or renamed file is the same adapter); an item without any has no 'lora' key, so
    records written before adapters existed still match."""
    out = {"request": dataclasses.asdict(item.request), **job}
    if item.adapters:
        out["lora"] = [{"sha256": a.sha256, "scale": a.scale} for a in item.adapters]
    return out


def expansion_key(item: Item, job: dict) -> dict:
    """What an item's prompt expansion depends on: the prompt, the seed it is sampled with, the image (I2V), the
    model and its dtype. A recorded expansion is reused only for the same key."""
    req = item.request
    return {"prompt": req.prompt, "seed": req.seed, "image": req.image, "model": job.get("model"),
            "dtype": job.get("dtype")}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} (this run: {b!r})")
    return out


def check_resume(items: list[Item], out_dir: Path, job: dict) -> None:
    """Read-only checks before anything runs: raise ValueError if resuming would mix settings or overwrite files
    this job did not write. Every rank can run it; nothing is written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output-dir {out_dir} exists and is not a folder")
    if not out_dir.exists():
        return
    state = read_manifest(out_dir / MANIFEST)
    recorded = {}
    for record in state.records:
        recorded.setdefault(record.get("output"), record)
    for item in items:
        record = recorded.get(item.output)
        if record is not None:
            diff = _differences(record.get("settings", {}), settings(item, job))
            if diff:
                raise ValueError(
                    f"{out_dir / MANIFEST}: {item.output} ({item.where}) was made with "
                    f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}; resume with the same prompt file and "
                    f"flags, or use another --output-dir")
        elif not state.exists:
            for name in outputs_of(item, job):
                if (out_dir / name).exists():
                    raise ValueError(
                        f"{out_dir / name} exists but {out_dir} has no {MANIFEST}, so it is not this job's work; "
                        f"finished outputs are never overwritten: choose an empty --output-dir or move the file")


def outputs_of(item: Item, job: dict) -> list[str]:
    return [item.output] + ([item.latents_name] if job.get("save_latents") else [])


# ---- the start of a job: lock, clean, verify, plan (rank 0) ----------------------------------------------------

class FolderLock:
    """An flock on ``path`` held for a process's life; the kernel drops it when the process ends, however it ends, so
    a killed holder never leaves a stale lock. The file names its holder for the refusal of the next one.

    ``busy``: the refusal while another process holds it (``{folder}``, ``{path}`` and ``{holder}`` filled in);
    ``unlockable``: the warning where the filesystem has no locks, or None for the error to stand."""

    def __init__(self, path: Path, busy: str, unlockable: str | None = None):
        self.path, self.busy, self.unlockable = path, busy, unlockable
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(self.busy.format(folder=self.path.parent, path=self.path, holder=holder)) from None
        except OSError as e:
            if self.unlockable is None or e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("warning: %s cannot be locked on this filesystem (%s); %s", self.path, e.strerror,
                        self.unlockable)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class JobLock(FolderLock):
    """DIR/.k5-job.lock, held by rank 0 for the whole job."""

    def __init__(self, out_dir: Path):
        super().__init__(out_dir / LOCK, "another job is writing to {folder} ({holder} holds {path}); wait for it to "
                         "end or choose another --output-dir",
                         "make sure no other job writes to this --output-dir")


@dataclass
class Plan:
    pending: list[int]  # item indices still to do, in order
    finished: int  # items of this prompt file already finished
    notes: list[str] = field(default_factory=list)


def _verify(out_dir: Path, record: dict, mode: str) -> str | None:
    """None if every file of the record is in place and matches it, else what is wrong."""
    for kind, f in record.get("files", {}).items():
        path = out_dir / f["name"]
        if not path.is_file():
            return f"{f['name']} is missing"
        size = path.stat().st_size
        if size != f["bytes"]:
            return f"{f['name']} has {size} bytes, the record says {f['bytes']} (truncated?)"
        if mode == "checksum" and sha256_file(path) != f["sha256"]:
            return f"{f['name']} does not match its recorded sha256"
        if mode == "checksum" and "checked" not in f and kind == "video":
            # Recorded by a k5 that published without checking (a full disk could end such a video early): the
            # checksum only says it is the file that was written, so check that it plays.
            req = record.get("settings", {}).get("request", {})
            problem = check_output(kind, path, {"frames": req.get("num_frames"), "width": req.get("width"),
                                                "height": req.get("height")})
            if problem:
                return f"{f['name']} was recorded but is not valid ({problem})"
    return None


def prepare(items: list[Item], out_dir: Path, job: dict, verify: str = "checksum") -> Plan:
    """Under the job lock, before any rank writes: delete a killed run's leftovers, drop damaged or broken records,
    and list the items still to do. Finished items' files are only read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = [f"removed leftover temporary file {p.name}" for p in clean_partials(out_dir)]
    path = out_dir / MANIFEST
    state = read_manifest(path)
    wanted = {item.output: item for item in items}
    keep, finished = [], set()
    dropped = len(state.damaged)
    if state.damaged:
        notes.append(f"{MANIFEST}: dropped damaged line(s) {', '.join(map(str, state.damaged))}")
    for record in state.records:
        name = record.get("output")
        item = wanted.get(name)
        if item is None:
            keep.append(record)  # another prompt file's item: not ours to judge
            continue
        problem = "recorded twice" if name in finished else _verify(out_dir, record, verify)
        if problem is None and record.get("settings") != settings(item, job):
            problem = "recorded with other settings"  # check_resume refuses this before we get here
        if problem is None:
            keep.append(record)
            finished.add(name)
        else:
            dropped += 1
            notes.append(f"{item.where}: {problem}; redoing it")
    for item in items:
        if item.output in finished:
            continue
        for name in outputs_of(item, job):
            if (out_dir / name).exists():
                # Published but never recorded (killed between the rename and the append) or failed verification.
                (out_dir / name).unlink()
                notes.append(f"removed {name}: not a finished item (no intact record)")
    if dropped or not state.ends_with_newline:
        replace_atomically(path, "".join(seal(r) + "\n" for r in keep))
    elif not state.exists:
        path.touch()
    pending = [item.index for item in items if item.output not in finished]
    return Plan(pending, len(finished), notes)


def deal(pending: list[int], dp: int, group: int) -> list[int]:
    """The items of dp group ``group``: item i goes to group i % dp, whatever else is finished."""
    return [i for i in pending if i % dp == group]


# ---- one item's files -----------------------------------------------------------------------------------------------

def targets_of(out_dir: Path, item: Item, job: dict) -> dict[str, Path]:
    """The item's files in the job folder, by kind (k5.launch.outputs.OUTPUTS): its video or image (by the name's
    extension), and its latents with --save-latents."""
    targets = {media_kind(item.output): out_dir / item.output}
    if job.get("save_latents"):
        targets["latents"] = out_dir / item.latents_name
    return targets


def write_item(out_dir: Path, item: Item, frames, latents, record: dict) -> dict:
    """Write the item's files and then its manifest record; on any error leave nothing of the item behind.
    ``frames``: uint8 [F, H, W, 3], the video's frames or the one frame of an image."""
    targets = targets_of(out_dir, item, {"save_latents": latents is not None})
    sealed = {}

    def commit(files: dict) -> None:
        sealed.update(record, files=files, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        append_line(out_dir / MANIFEST, seal(sealed))

    write_outputs(targets, {media_kind(item.output): frames, "latents": latents}, commit)
    return sealed


class JobFolder:
    """A job's folder as the destination of the job loop: lock, resume plan, files and manifest records, logs."""

    shared_plan = True  # rank 0 makes the plan, the other ranks receive it

    def __init__(self, out_dir: Path, job: dict, verify: str):
        self.out_dir, self.job, self.verify = Path(out_dir), job, verify
        self.log_dir = self.out_dir / "logs"
        self.metrics_path = self.out_dir / METRICS
        self.lock: JobLock | None = None
        self._expansions: dict[str, str] | None = None  # EXPANSIONS, read on first use

    def start(self, items: list[Item]) -> Plan:
        """Rank 0, before any rank writes: take the lock, clean up, verify, plan (ValueError if locked)."""
        self.lock = JobLock(self.out_dir).acquire()
        plan = prepare(items, self.out_dir, self.job, self.verify)
        # A line a kill cut short would swallow the next one appended after it: drop it now, before any rank appends.
        expansions = read_manifest(self.out_dir / EXPANSIONS)
        if expansions.damaged or not expansions.ends_with_newline:
            replace_atomically(self.out_dir / EXPANSIONS, "".join(seal(r) + "\n" for r in expansions.records))
        return plan

    def targets(self, item: Item) -> dict[str, Path]:
        return targets_of(self.out_dir, item, self.job)

    def write(self, item: Item, data: dict, record: dict) -> dict:
        """Publish the item's files, then append its record; return the record."""
        latents = data["latents"] if self.job.get("save_latents") else None
        return write_item(self.out_dir, item, data[media_kind(item.output)], latents, record)

    def recorded_expansion(self, item: Item) -> str | None:
        """The expansion recorded for the item's key by an earlier run (or this one), None if there is none.

        Called by the rank that expands (the item group's rank 0). Lines come whole or not at all (sealed, one
        write each), so a line cut by a kill is skipped and that expansion generated again."""
        if self._expansions is None:
            self._expansions = {}
            for record in read_manifest(self.out_dir / EXPANSIONS).records:
                if isinstance(record.get("key"), dict) and isinstance(record.get("expanded"), str):
                    self._expansions[json.dumps(record["key"], sort_keys=True)] = record["expanded"]
        return self._expansions.get(json.dumps(expansion_key(item, self.job), sort_keys=True))

    def record_expansion(self, item: Item, text: str) -> None:
        """Keep a generated expansion before the item is denoised, so a resumed job does not generate it again."""
        key = expansion_key(item, self.job)
        append_line(self.out_dir / EXPANSIONS, seal({"key": key, "expanded": text, "output": item.output}))
        if self._expansions is not None:
            self._expansions[json.dumps(key, sort_keys=True)] = text

    def describe(self, done: int, before: int) -> str:
        return (f"{done} item(s) -> {self.out_dir} ({before} finished before; videos, {MANIFEST}, {METRICS}, "
                f"logs/)")

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
