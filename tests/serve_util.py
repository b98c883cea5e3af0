"""Start and drive `k5 serve` in tests.

The server runs as real processes (tests/serve_harness.py: the `k5 serve` command plus a step gate): one process,
or several ranks meeting at a TCPStore this test process hosts on a port the kernel picked (tests/distributed.py).
The server listens on port 0 and writes the port it got into its state folder (server.json), where the test reads
it: no port is chosen here and handed out later. Every wait polls something the server shows, with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from distributed import HOST

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "serve_harness.py"
TINY = ["--model", "tiny", "--height", "64", "--width", "64", "--num-frames", "5", "--steps", "2"]


def wait_until(check, limit_s: float, what: str, procs=()):
    """Poll ``check()`` every 20 ms until it returns something truthy (returned); fail after ``limit_s`` or when a
    server process has ended."""
    deadline = time.monotonic() + limit_s
    while True:
        value = check()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"a server process ended (exit {p.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"{what} did not happen within {limit_s} s"
        time.sleep(0.02)


class Server:
    def __init__(self, state: Path, args: list[str], world: int = 1, api_key: str | None = None,
                 env: dict | None = None):
        self.state, self.args, self.world, self.api_key = Path(state), list(args), world, api_key
        self.gate = self.state.parent / f"{self.state.name}.gate"  # outside the state folder
        self.env = env or {}
        self.procs: list[subprocess.Popen] = []
        self.store = None
        self.starts = 0
        self.address: dict | None = None

    # ---- processes ----

    def start(self) -> "Server":
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "server.json").unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "K5_SERVE_GATE": str(self.gate), **self.env}
        if self.api_key:
            env["K5_API_KEY"] = self.api_key
        self.starts += 1
        if self.world > 1:  # a fresh store per start, as a new torchrun would have
            self.store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=300))
        self.procs = []
        for rank in range(self.world):
            rank_env = dict(env)
            if self.world > 1:
                rank_env.update(MASTER_ADDR=HOST, MASTER_PORT=str(self.store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                                RANK=str(rank), WORLD_SIZE=str(self.world), LOCAL_RANK=str(rank),
                                LOCAL_WORLD_SIZE=str(self.world))
            out = open(self.state.parent / f"{self.state.name}.start{self.starts}.rank{rank}.err", "w")
            self.procs.append(subprocess.Popen(
                [sys.executable, str(HARNESS), *self.args, "--state-dir", str(self.state), "--port", "0"],
                env=rank_env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True))
        return self

    def wait_ready(self, limit_s: float = 240.0) -> "Server":
        def address():
            try:
                found = json.loads((self.state / "server.json").read_text())
            except (FileNotFoundError, ValueError):
                return None
            return found if found["pid"] == self.procs[0].pid else None

        self.address = wait_until(address, limit_s, "server.json", self.procs)
        wait_until(lambda: self.health() == 200, limit_s, "GET /health 200", self.procs)
        return self

    def health(self) -> int:
        try:
            return self.http("GET", "/health", timeout=5)[0]
        except OSError:
            return 0

    def http(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60,
             chunked: bool = False, auth: bool = True) -> tuple[int, dict, object]:
        """A plain HTTP request (the standard library's client): (status, headers, JSON body or bytes). ``body``: a
        dict (sent as JSON), bytes, or an iterable of bytes (``chunked``: no Content-Length). ``auth``: send the
        server's API key unless ``headers`` has an Authorization of its own."""
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        headers = dict(headers or {})
        if auth and self.api_key and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if isinstance(body, dict):
            body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        try:
            conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
            r = conn.getresponse()
            data = r.read()
            found = {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()
        if found.get("content-type", "").startswith("application/json"):
            data = json.loads(data)
        return r.status, found, data

    def stop(self, sig: int = signal.SIGTERM, limit_s: float = 120.0) -> list[int]:
        """Send ``sig`` to every rank; their exit codes."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)
        return self.wait_exit(limit_s)

    def kill(self) -> None:
        """SIGKILL to every server process at once (the whole server gone without a word)."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        self.wait_exit(30)

    def wait_exit(self, limit_s: float) -> list[int]:
        deadline = time.monotonic() + limit_s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"server rank did not end within {limit_s} s:\n{self.output()}") from None
        return [p.returncode for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
        self.release()

    # ---- talking to it ----

    @property
    def url(self) -> str:
        return self.address["url"]

    def client(self, api_key: str | None = None):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "no-key-needed",
                             max_retries=0, timeout=120)

    def hold(self, steps: int) -> None:
        """Every rank holds a job after step ``steps`` until ``hold`` of a larger number or ``release``."""
        tmp = self.gate.with_suffix(".tmp")
        tmp.write_text(str(steps))
        os.replace(tmp, self.gate)

    def release(self) -> None:
        self.gate.unlink(missing_ok=True)

    def video(self, job_id: str):
        return self.client().videos.retrieve(job_id)

    def wait_status(self, job_id: str, statuses=("completed", "failed"), limit_s: float = 180.0):
        return wait_until(lambda: (v := self.video(job_id)).status in statuses and v, limit_s,
                          f"{job_id} to be {'/'.join(statuses)}", self.procs)

    def wait_progress(self, job_id: str, progress: int, limit_s: float = 180.0):
        return wait_until(lambda: (v := self.video(job_id)).progress >= progress and v, limit_s,
                          f"{job_id} to reach {progress}%", self.procs)

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {'name{labels}': value}."""
        status, _, text = self.http("GET", "/metrics")
        assert status == 200, text
        out = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def log(self, rank: int) -> str:
        return (self.state / "logs" / f"rank{rank}.log").read_text()

    def output(self) -> str:
        return "\n".join(f"--- rank {r}:\n" + (self.state.parent / f"{self.state.name}.start{self.starts}.rank{r}.err")
                         .read_text()[-3000:] for r in range(self.world))
