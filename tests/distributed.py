"""Run a function in real worker processes joined by a gloo process group.

Multi-process tests compare what N processes compute with what one process computes, so the
workers must be real processes with their own interpreter (spawn, not fork: a forked child of a
process that already ran OpenMP work can hang). Each worker returns a value; the parent gets the
list of values in rank order.

No port is ever handed out after it was found free (another process on a loaded machine may take
it in between): the parent hosts the rendezvous TCPStore itself, bound to port 0 (the kernel picks
a port and the store keeps it open), and the workers connect to it as clients, the way torchrun's
workers use the agent's store (``TORCHELASTIC_USE_AGENT_STORE``). Gloo's own connections are made
on ports the kernel picks and exchanged through that store.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"


@contextmanager
def hosted_store(timeout_s: float = 300.0) -> Iterator[dist.TCPStore]:
    """A TCPStore server in this process on a port the kernel picked; ``store.port`` is the port.

    Processes started with ``store_env(store)`` in their environment initialise their process group
    (``env://``) and any other store client against it, without binding a port of their own."""
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    try:
        yield store
    finally:
        del store


def store_env(store: dist.TCPStore) -> dict[str, str]:
    """Environment for a worker that meets the others through ``store`` (as torchrun sets it for its workers)."""
    return {"MASTER_ADDR": HOST, "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


def _worker(rank: int, world_size: int, rendezvous: dict, out_dir: str, fn: Callable, args: tuple,
            env: dict) -> None:
    os.environ.update(env)
    os.environ.update(rendezvous)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, env: dict | None = None) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return their results.

    ``fn`` must be defined at module level (it is pickled by name). A worker that raises makes this
    raise, with the worker's traceback in the message.
    """
    with tempfile.TemporaryDirectory() as out_dir, hosted_store() as store:
        mp.start_processes(
            _worker, args=(world_size, store_env(store), out_dir, fn, args, env or {}),
            nprocs=world_size, join=True, start_method="spawn",
        )
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
