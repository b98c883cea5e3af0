"""``--nproc-per-node N``: check the inputs once in this process, then start this machine's N workers.

What ``torchrun --standalone --nproc-per-node N launch/generate.py ...`` does, with two differences for the user: a
bad input is reported once, by the check that runs here before any worker starts (exit code 2, no worker, no
launcher traceback), and this process exits with the workers' own exit code (0 done, 1 failed, 2 refused, 143/130
stopped) instead of torchrun's 1 for every failure. On GPUs this process opens no CUDA context (it would hold GPU 0
memory for the whole job), so the memory check before loading is left to the workers, each on its own GPU. The
rendezvous binds a port the kernel picks (``--standalone``), so several jobs on one machine never collide.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

GENERATE = Path(__file__).with_name("generate.py")


def worker_argv(argv: list[str]) -> list[str]:
    """The arguments without ``--nproc-per-node`` (the workers are the N processes)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out


def start_workers(n: int, argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets anyway, without its warning
    # The workers say what went wrong; the agent's own account of a failed worker would only repeat it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={n}", "--max-restarts=0",
                                         str(GENERATE), *worker_argv(argv[1:])])
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -15: killed by SIGTERM
    except SignalException as e:  # this process got SIGTERM/SIGINT: the agent passed it to the workers
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0
