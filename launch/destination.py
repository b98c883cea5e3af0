"""Where a run's results go: the ``Destination`` protocol of the job loop (k5.launch.job), and its simplest kind.

Kinds: ``OutputFiles`` (a single run's explicit paths: ``--output``, ``--save-latents PATH``, ``--save-frames PATH``),
``k5.launch.batch.JobFolder`` (a job folder: lock, manifest, resume, logs) and, for `k5 serve`, each request's own
job folder. A new kind implements these methods; the job loop asks nothing else of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from k5.launch.batch import Plan
from k5.launch.outputs import write_outputs
from k5.launch.prompts import Item


class Destination(Protocol):
    out_dir: Path | None  # the folder a resumable job lives in; None: explicit paths, nothing to resume
    log_dir: Path | None  # where every rank's log goes; None: stderr only
    metrics_path: Path | None  # where the run's metrics document goes besides --metrics-json
    shared_plan: bool  # rank 0 makes the plan and the other ranks receive it (else every rank makes the same)

    def start(self, items: list[Item]) -> Plan:
        """Before any rank writes: which items are pending (ValueError when the destination cannot be used)."""

    def targets(self, item: Item) -> dict[str, Path]:
        """kind ("video", "image", "latents", "frames") -> the path the item's file of that kind gets."""

    def write(self, item: Item, data: dict, record: dict) -> dict:
        """Publish the item's files (checked, then renamed into place) and return its record."""

    def describe(self, done: int, before: int) -> str:
        """What the run wrote, for its last line."""

    def recorded_expansion(self, item: Item) -> str | None:
        """A prompt expansion an earlier run recorded for the item (resume), else None."""

    def record_expansion(self, item: Item, text: str) -> None:
        """Keep a generated expansion before the item is denoised."""

    def close(self) -> None:
        """Release what ``start`` took (a job folder's lock)."""


class OutputFiles:
    """A single run's explicit paths as the destination: one item, no manifest, no resume, no log folder; the
    expansion of its prompt goes to the summary (metrics) only."""

    out_dir = None
    log_dir = None
    metrics_path = None
    shared_plan = False  # every rank knows the plan: the one item

    def __init__(self, paths: dict[str, Path]):
        self.paths = paths

    def start(self, items: list[Item]) -> Plan:
        return Plan([item.index for item in items], 0)

    def targets(self, item: Item) -> dict[str, Path]:
        return dict(self.paths)

    def write(self, item: Item, data: dict, record: dict) -> dict:
        return {**record, "files": write_outputs(self.paths, {k: data[k] for k in self.paths})}

    def describe(self, done: int, before: int) -> str:
        return ", ".join(str(p) for p in self.paths.values())

    def recorded_expansion(self, item: Item) -> str | None:
        return None

    def record_expansion(self, item: Item, text: str) -> None:
        return None

    def close(self) -> None:
        return None
