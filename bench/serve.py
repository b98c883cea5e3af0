"""`k5 serve` against separate CLI runs: N requests through one running server, and the same N items as N separate
`k5 generate` processes (each imports, loads the model, generates, writes, exits).

    python -m k5.bench serve                        # tiny model, N=10, 128x128x9, 4 steps, CPU
    python -m k5.bench serve -n 3 --no-save         # a quick look
    python -m k5.bench serve --model M --device cuda --steps 50 ...   (a GPU: any model the CLI takes)

Measured, per mode:
- CLI: each run's wall time (process start to exit), their total;
- server: its start-up (process start to GET /health 200: imports, model load), then the N requests sent one after
  another, each POST /v1/videos, polled with GET every ``--poll-ms`` until completed, then its MP4 downloaded; each
  request's latency (POST to the last byte) and its own generate time as the server measured it (the job's text,
  denoising, decode and checked write: ``k5.generate_s``); the overhead is the difference: queueing, dispatch,
  status, upload and download, the poll interval included (at most ``--poll-ms`` of it);
- server throughput: the N requests sent at once, wall time to the last completion, requests per minute.

Targets (issue 21): on the tiny model, the server's N=10 requests in under half the CLI's total wall time (judged
with the server's start-up included); server overhead per request under 50 ms (judged on the median and the
maximum). The script exits 1 when a step fails; a target that is not met is reported as such, not as a failure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.exit("bench/serve.py is a module of k5.bench: run `python -m k5.bench serve ...` or `k5 bench serve ...`")

from k5.bench import report


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="k5 bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="what --model names for both; default tiny")
    p.add_argument("-n", type=int, default=10, help="requests (and CLI runs); default 10")
    p.add_argument("--height", type=int, default=128, help="default 128")
    p.add_argument("--width", type=int, default=128, help="default 128")
    p.add_argument("--frames", type=int, default=9, help="default 9")
    p.add_argument("--steps", type=int, default=4, help="default 4")
    p.add_argument("--device", default=None, help="passed to both (--device); default: theirs")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the server and of each CLI run; default: unset (torch's default)")
    p.add_argument("--poll-ms", type=float, default=5.0, help="the client's poll interval; default 5")
    p.add_argument("--out", default=str(report.SCRATCH), help=f"where the result goes; default {report.SCRATCH}")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--no-cli", action="store_true",
                   help="the server only (its overhead per request); the CLI comparison is then NOT MEASURED")
    return p.parse_args(argv)


class Client:
    def __init__(self, url: str):
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        status, data = self.request(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data)


def env_for(args) -> dict:
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def common(args) -> list[str]:
    flags = ["--model", args.model, "--height", str(args.height), "--width", str(args.width), "--num-frames",
             str(args.frames), "--steps", str(args.steps)]
    return flags + (["--device", args.device] if args.device else [])


def prompt(i: int) -> str:
    return f"a red fox running through snow, take {i}"


def run_cli(args, work: Path) -> list[float]:
    times = []
    for i in range(args.n):
        out = work / f"cli{i}.mp4"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "k5", "generate", *common(args), "--prompt", prompt(i), "--seed",
                            str(i), "--output", str(out)], capture_output=True, text=True, env=env_for(args))
        times.append(time.perf_counter() - t0)
        if r.returncode != 0 or not out.is_file():
            raise RuntimeError(f"CLI run {i} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        print(f"  cli {i + 1}/{args.n}: {times[-1]:.2f} s", file=sys.stderr)
    return times


def start_server(args, state: Path) -> tuple[subprocess.Popen, Client, float]:
    log = open(state.parent / "server.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "k5", "serve", *common(args), "--state-dir", str(state),
                             "--port", "0", "--max-queue", str(max(64, args.n))], stdout=log,
                            stderr=subprocess.STDOUT, env=env_for(args), start_new_session=True)
    deadline = time.monotonic() + 600
    client = None
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server ended (exit {proc.returncode}):\n"
                               f"{(state.parent / 'server.log').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the server was not ready within 600 s")
        if client is None:
            try:
                found = json.loads((state / "server.json").read_text())
                if found["pid"] == proc.pid:
                    client = Client(found["url"])
            except (FileNotFoundError, ValueError):
                pass
        if client is not None:
            try:
                if client.request("GET", "/health")[0] == 200:
                    return proc, client, time.perf_counter() - t0
            except OSError:
                pass
        time.sleep(0.01)


def wait_done(client: Client, job_id: str, poll_s: float) -> dict:
    while True:
        video = client.json("GET", f"/v1/videos/{job_id}")
        if video["status"] == "completed":
            return video
        if video["status"] == "failed":
            raise RuntimeError(f"{job_id} failed: {video['error']}")
        time.sleep(poll_s)


def submit(client: Client, args, i: int) -> str:
    return client.json("POST", "/v1/videos", {"prompt": prompt(i), "seed": i})["id"]


def download(client: Client, job_id: str) -> int:
    status, data = client.request("GET", f"/v1/videos/{job_id}/content")
    if status != 200 or not data:
        raise RuntimeError(f"download of {job_id}: HTTP {status}")
    return len(data)


def sequential(client: Client, args) -> list[dict]:
    out = []
    for i in range(args.n):
        t0 = time.perf_counter()
        job_id = submit(client, args, i)
        video = wait_done(client, job_id, args.poll_ms / 1000)
        size = download(client, job_id)
        latency = time.perf_counter() - t0
        generate_s = video["k5"]["generate_s"]
        out.append({"latency_s": latency, "generate_s": generate_s, "overhead_s": latency - generate_s,
                    "bytes": size})
        print(f"  request {i + 1}/{args.n}: {latency * 1000:.1f} ms, generate {generate_s * 1000:.1f} ms, overhead "
              f"{(latency - generate_s) * 1000:.1f} ms", file=sys.stderr)
    return out


def at_once(client: Client, args) -> float:
    t0 = time.perf_counter()
    ids = [submit(client, args, 100 + i) for i in range(args.n)]
    for job_id in ids:
        wait_done(client, job_id, args.poll_ms / 1000)
        download(client, job_id)
    return time.perf_counter() - t0


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="k5-bench-serve-"))
    proc = None
    try:
        cli = None
        if not args.no_cli:
            print(f"bench serve: {args.n} separate CLI runs ...", file=sys.stderr)
            cli = run_cli(args, work)
        print("bench serve: starting the server ...", file=sys.stderr)
        state = work / "state"
        proc, client, start_s = start_server(args, state)
        print(f"  ready after {start_s:.2f} s; {args.n} requests one after another ...", file=sys.stderr)
        seq = sequential(client, args)
        print(f"bench serve: {args.n} requests at once ...", file=sys.stderr)
        burst_s = at_once(client, args)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        if code != 143:
            raise RuntimeError(f"the server ended with {code} after SIGTERM, not 143")
        proc = None
    except Exception as e:
        print(f"bench serve: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)

    overhead = [r["overhead_s"] for r in seq]
    seq_total = sum(r["latency_s"] for r in seq)
    result = {
        "name": f"{'cpu' if (args.device or 'cpu') == 'cpu' else args.device}-serve-{args.model}-n{args.n}-"
                f"{args.height}x{args.width}x{args.frames}-{args.steps}steps",
        "env": report.environment(torch.device(args.device or "cpu"), ["serve", *(argv or sys.argv[1:])]),
        "config": {"model": args.model, "n": args.n, "size": f"{args.height}x{args.width}x{args.frames}",
                   "steps": args.steps, "threads": args.threads, "poll_ms": args.poll_ms},
        "cli": {"per_run_s": stats(cli), "total_s": sum(cli)} if cli else "NOT MEASURED (--no-cli)",
        "server": {"startup_s": start_s, "sequential_total_s": seq_total,
                   "sequential_with_startup_s": start_s + seq_total, "latency_s": stats([r["latency_s"] for r in seq]),
                   "generate_s": stats([r["generate_s"] for r in seq]), "overhead_ms": {
                       k: v * 1000 for k, v in stats(overhead).items()},
                   "at_once_s": burst_s, "requests_per_minute": args.n / burst_s * 60,
                   "cli_runs_per_minute": args.n / sum(cli) * 60 if cli else None},
    }
    ratio = (start_s + seq_total) / sum(cli) if cli else None
    result["targets"] = {
        "server_with_startup_over_cli_total": ratio,
        "server_under_half_the_cli": "NOT MEASURED" if ratio is None else "MET" if ratio < 0.5 else "NOT MET",
        "overhead_median_under_50ms": "MET" if statistics.median(overhead) < 0.05 else "NOT MET",
        "overhead_max_under_50ms": "MET" if max(overhead) < 0.05 else "NOT MET",
        "not_measured": "GPU: no GPU run in this result" if (args.device or "cpu") == "cpu" else "",
    }
    s = result["server"]
    versus = (f"CLI {args.n} runs {sum(cli):.1f} s ({s['cli_runs_per_minute']:.1f}/min); server start {start_s:.1f} s "
              f"+ {args.n} requests {seq_total:.2f} s = {ratio:.3f} of the CLI "
              f"({result['targets']['server_under_half_the_cli']})" if cli else
              f"CLI NOT MEASURED; server start {start_s:.1f} s + {args.n} requests {seq_total:.2f} s")
    print(f"{result['name']}: {versus}; at once {burst_s:.2f} s = "
          f"{s['requests_per_minute']:.0f} requests/min; overhead per request median "
          f"{s['overhead_ms']['median']:.1f} ms, max {s['overhead_ms']['max']:.1f} ms "
          f"(< 50 ms: median {result['targets']['overhead_median_under_50ms']}, max "
          f"{result['targets']['overhead_max_under_50ms']})")
    if not args.no_save:
        for path in report.write(result, Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
    return 0
