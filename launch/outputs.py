"""Writing results so that a finished file is never half-written, overwritten or lost."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file


def refuse_existing(*paths: str | Path | None) -> None:
    """Raise before any work is done if an output would replace a finished file."""
    for p in paths:
        if p is not None and Path(p).exists():
            raise FileExistsError(f"output {p} already exists; finished outputs are never overwritten: choose "
                                  f"another name or move the old file away")


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Move a complete temporary file to its final name, refusing to replace a file that appeared meanwhile."""
    path = Path(path)
    try:
        os.link(tmp, path)  # unlike rename(), link() fails atomically on an existing name
    except FileExistsError:
        raise FileExistsError(f"{path} appeared while this run was writing it; not overwritten") from None
    finally:
        os.unlink(tmp)
    return path


def save_tensors(path: str | Path, tensors: dict) -> Path:
    """safetensors file written under a temporary name in the same folder, then published."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return publish(tmp, path)
