"""Faults a test cannot make with plain files: a filesystem that is full or read-only.

Where the sandbox allows it (``unshare`` with a user and mount namespace, which needs no privilege where user
namespaces are enabled, and works for root), the test runs its commands in a private mount namespace and mounts a
real tmpfs of a chosen size, so writes fail with the errors a real full or read-only disk gives (ENOSPC, EROFS).
Elsewhere ``limit_file_size`` gives the same failure at the write through RLIMIT_FSIZE (EFBIG, "File too large").
"""

from __future__ import annotations

import functools
import resource
import signal
import subprocess


@functools.cache
def can_mount() -> bool:
    probe = ('d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d"; r=$?; rmdir "$d"; exit $r')
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_mount_namespace(script: str, env: dict, args=(), timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a bash script (``args`` are its "$@") in a private mount namespace (its mounts vanish with it)."""
    return subprocess.run(["unshare", "-rm", "bash", "-c", script, "bash", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def limit_file_size(limit: int):
    """preexec_fn for a child whose files may not grow past ``limit`` bytes: writes beyond fail with EFBIG
    (SIGXFSZ ignored, as it stays across exec), like a disk that is full at that point."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply
