"""Writing results so that a finished file is never half-written, overwritten or lost."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from k5.engine.video import publish  # noqa: F401  (re-exported for batch.py)


def refuse_existing(*paths: str | Path | None) -> None:
    """Raise before any work is done if an output would replace a finished file."""
    for p in paths:
        if p is not None and Path(p).exists():
            raise FileExistsError(f"output {p} already exists; finished outputs are never overwritten: choose "
                                  f"another name or move the old file away")


def save_tensors(path: str | Path, tensors: dict) -> Path:
    """safetensors file written under a temporary name in the same folder, then published."""
    tmp = temp_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return publish(tmp, path)


# ---- batch jobs: checksums, temporary files left by a killed run, records appended in one write ----------------

PARTIAL_MARK = ".partial"  # every temporary output here and in engine.video is ".<name>.<random>.partial[...]"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name next to ``path`` that ``clean_partials`` recognises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_MARK)
    os.close(fd)
    return Path(tmp)


def is_partial(name: str) -> bool:
    return name.startswith(".") and PARTIAL_MARK in name


def clean_partials(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed run left in ``folder`` (not its subfolders); return them.

    Only call this while no other process writes into ``folder`` (the job lock says so): a live writer's temporary
    file looks the same as a dead one's.
    """
    removed = []
    for p in Path(folder).iterdir():
        if is_partial(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single write() on an O_APPEND descriptor.

    Each write lands at the end of the file as a whole: two processes appending at once on one machine (or on
    Lustre/GPFS) never interleave their lines. NFS does not honour O_APPEND across clients; readers of the
    manifest therefore check every line's own checksum and treat a damaged line as missing.
    """
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and rename(): readers see the old or the new file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
