"""`k5 serve` as the server tests start it: the real command, plus a step gate the tests hold jobs with.

    python tests/serve_harness.py SERVE_ARGS...        (one process, or one rank of several: RANK, WORLD_SIZE, ...)

With ``K5_SERVE_GATE=PATH`` every rank, after denoising step N of a job, waits while PATH holds a number <= N (a
missing file holds nothing). A test writes 1 and sees the job at step 1, writes 2 and sees step 2, ...; or holds a
job at step 2 while it kills or cancels it. The gate wraps k5.serve.ranks.GroupWorker.on_step from outside: the
shipped server has no test hook.
"""

import os
import sys
import time
from pathlib import Path


def gated(on_step, gate: Path):
    def step(self, job_id: str, done: int, total: int) -> None:
        on_step(self, job_id, done, total)  # the progress is published first: the test sees the step it holds at
        while True:
            try:
                allowed = int(gate.read_text())
            except FileNotFoundError:
                return
            except ValueError:  # tests replace the file atomically; an odd read is retried
                allowed = 0
            if allowed > done:
                return
            time.sleep(0.01)

    return step


def main() -> int:
    gate = os.environ.get("K5_SERVE_GATE")
    if gate:
        from k5.serve.ranks import GroupWorker

        GroupWorker.on_step = gated(GroupWorker.on_step, Path(gate))
    from k5.launch.cli import main as k5

    return k5(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
