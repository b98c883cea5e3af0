"""`k5 serve`: the model loads once and requests come over HTTP (k5.serve.app), on one process or under torchrun.

    k5 serve --model M --state-dir DIR [generate's model, layout and default-request flags]
    torchrun --nproc_per_node=8 -m k5 serve --model M --state-dir DIR --ulysses-degree 4 --cfg-parallel

Every rank checks the flags as `k5 generate` does (bad input: one message, exit 2, before anything loads or
binds), loads the model once and runs the jobs of its data-parallel group (k5.serve.ranks). Rank 0 also holds the
state folder, the job store and the HTTP server, and hands out the jobs (k5.serve.dispatch).

The state folder (``--state-dir``)::

    jobs.sqlite3          the job store (k5.serve.store): every accepted request, its status and its files
    jobs/<id>/            a job's files, written by the CLI's checked path: <id>.mp4 (or .png; <id>.safetensors
                          with --save-latents), manifest.jsonl (its record), metrics.json, expansions.jsonl
    uploads/upload_<random>.<ext>    uploaded images (I2V, edits), named by the server
    logs/rank<r>.log      every rank's log
    server.json           where the running server listens: {"url", "host", "port", "pid", ...}
    .k5-serve.lock        held by rank 0 while it runs: one server per state folder

Ending: SIGTERM (or Ctrl-C) stops accepting, stops the running job(s) at the next step, puts them back in the queue
and exits 143 (130) on every rank. A rank that raises, dies or hangs ends every rank with exit 1 (the
k5.launch.supervisor rules); the job it ran stays queued with the failure as its error, and the next start runs it
again (up to --max-attempts starts, then it fails). A restart re-runs what was running and keeps what finished.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from k5.launch.batch import FolderLock
from k5.launch.logs import LOGGER
from k5.launch.supervisor import Supervisor

log = logging.getLogger(LOGGER)
EXIT_USAGE = 2
# The generate command's flags that a server takes: the model, the layout, and the defaults of its requests.
SHARED = ("model", "variant", "list_variants", "magcache", "components", "task", "negative_prompt", "height", "width",
          "num_frames", "steps", "guidance_scale", "shift", "seed", "dtype", "device", "compile", "attention_backend",
          "offload", "lora", "expand_prompt", "attention", "nabla_threshold", "ulysses_degree", "ring_degree",
          "tp_degree", "cfg_parallel", "dp_degree", "timeout")


def serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", required=True, metavar="DIR",
                   help="the server's folder: job store, outputs, uploads, logs, server.json (see the README); a "
                        "restart with the same folder runs the jobs that were queued or running; required")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; any address other than loopback needs --api-key; default 127.0.0.1")
    p.add_argument("--port", type=int, default=8000,
                   help="TCP port; 0: one the kernel picks (read it from DIR/server.json); default 8000")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' (the OpenAI SDK's api_key); default: "
                        "$K5_API_KEY, else none (then only a loopback --host is allowed)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="jobs that may wait (the running ones not counted); more are refused with 429 and "
                        "Retry-After; default 64")
    p.add_argument("--max-upload-mb", type=float, default=16.0, metavar="MB",
                   help="largest uploaded image (input_reference, an edit's image); larger: 413; default 16")
    p.add_argument("--retention-hours", type=float, default=24.0, metavar="H",
                   help="finished jobs and their files are deleted this long after they end (the job's expires_at); "
                        "0 keeps them; default 24")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="LoRA adapters a request may name by their file or folder name in DIR ('lora': "
                        "\"NAME[:SCALE]\"); default: none (requests take the --lora adapters only)")
    p.add_argument("--save-latents", action="store_true",
                   help="also keep each video's final latents (<id>.safetensors), downloadable with "
                        "?variant=latents; default off")
    p.add_argument("--poll-after-ms", type=int, default=250, metavar="MS",
                   help="the openai-poll-after-ms header of a queued or running job (the OpenAI SDK's poll "
                        "interval); default 250")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="a job whose run the server ended this many times (a crash, a failed rank) fails instead of "
                        "running again; default 3")


def build_parser() -> argparse.ArgumentParser:
    """The serve flags and the generate command's SHARED flags (the same Action objects: same help, checks)."""
    from k5.launch.generate import Parser, build_parser as generate_parser

    p = Parser(prog="k5 serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_flags(p)
    shared = p.add_argument_group("the model, its layout and the defaults of its requests (as `k5 generate`)")
    for action in generate_parser()._actions:
        if action.dest in SHARED:
            shared._add_action(action)  # the same Action: its flags, type checks and help
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the serve flags, the generate flags for k5.serve.engine.Engine.prepare)."""
    args = build_parser().parse_args(argv)  # usage errors and --help
    only = argparse.ArgumentParser(add_help=False)
    serve_flags(only)
    _, rest = only.parse_known_args(argv)
    return args, rest + (["--save-latents"] if args.save_latents else [])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_args(args) -> None:
    """The serve flags' own rules (ValueError), before anything loads or binds."""
    if not is_loopback(args.host) and not args.api_key:
        raise ValueError(f"--host {args.host} accepts connections from other machines: give --api-key KEY (or set "
                         f"K5_API_KEY) so that only clients with the key are served, or listen on --host 127.0.0.1")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0-65535; 0: the kernel picks one)")
    for flag, value, low in (("--max-queue", args.max_queue, 1), ("--max-attempts", args.max_attempts, 1),
                             ("--poll-after-ms", args.poll_after_ms, 1)):
        if value < low:
            raise ValueError(f"{flag} {value} must be at least {low}")
    if not args.max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb {args.max_upload_mb:g} must be a positive number of MiB")
    if not args.retention_hours >= 0:
        raise ValueError(f"--retention-hours {args.retention_hours:g} must be >= 0 (0 keeps finished jobs)")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise ValueError(f"--lora-dir {args.lora_dir} is not a folder; give the folder that holds the LoRA adapters "
                         f"requests may name")


def state_lock(state: Path) -> FolderLock:
    """DIR/.k5-serve.lock for the server's life: one server per state folder."""
    return FolderLock(state / ".k5-serve.lock", "another k5 serve uses {folder} ({holder}); stop it or choose another "
                      "--state-dir")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads (port 0: the kernel's choice, kept open: no race)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (0: any free one) "
                         f"or --host") from None
    sock.listen(256)
    return sock


class HttpThread:
    """uvicorn on the bound socket, in a thread of rank 0 (signals stay with the main thread's StopSignals)."""

    def __init__(self, app, sock: socket.socket):
        import uvicorn

        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server, self.sock = uvicorn.Server(config), sock
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="k5-http",
                                       daemon=True)

    def start(self) -> "HttpThread":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()


def recover(store, engine, jobs_dir: Path, uploads_dir: Path, max_attempts: int, retention_s: float | None) -> None:
    """Rank 0, before anything runs: what the last server left. A job it ran is completed when its record and files
    are intact (it finished, the store never heard), else queued again (its leftovers deleted, the CLI's resume
    rules), or failed after --max-attempts starts. Uploads of requests that were never committed are deleted."""
    for row in store.in_progress():
        record = engine.finished(row["spec"], jobs_dir / row["id"], row["id"])
        if record is not None:
            store.complete(row["id"], {"files": record["files"], "metrics": {
                "prompt_expansion": record.get("prompt_expansion"), "recovered": True}}, retention_s)
            log.info("job %s: finished before the last server ended; recorded as completed", row["id"])
        elif row["attempts"] >= max_attempts:
            last = (row["error"] or {}).get("message", "no error was recorded")
            store.fail(row["id"], "server_error", f"the server ended {row['attempts']} times while running this job "
                                                  f"(--max-attempts {max_attempts}); last: {last}", retention_s)
            log.info("job %s: failed after %d attempts", row["id"], row["attempts"])
        else:
            store.requeue(row["id"])
            log.info("job %s: was running when the last server ended; queued again", row["id"])
    known = {r["spec"]["request"].get("image") for r in store.list(limit=10**9)}
    for upload in uploads_dir.glob("*") if uploads_dir.is_dir() else ():
        if str(upload) not in known:
            upload.unlink(missing_ok=True)


def requeue_running(db: Path, text: str) -> None:
    """On rank 0 as a failure ends the server (any thread): the running jobs go back to the queue with the failure
    (which names the rank) as their error."""
    from k5.serve.store import JobStore

    store = JobStore(db, max_queue=1)
    try:
        message = text.splitlines()[0].removeprefix("error: ")
        for row in store.in_progress():
            store.requeue(row["id"], "server_error", f"{message}; the job runs again when the server restarts")
    finally:
        store.close()


def write_address(state: Path, sock: socket.socket, host: str, model: str) -> dict:
    from k5.launch.outputs import replace_atomically

    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    address = {"url": f"http://{shown}:{port}", "host": host, "port": port, "pid": os.getpid(),
               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model}
    replace_atomically(state / "server.json", json.dumps(address) + "\n")
    return address


def main(argv: list[str] | None = None) -> int:
    args, flags = parse(sys.argv[1:] if argv is None else list(argv))
    args.api_key = args.api_key or os.environ.get("K5_API_KEY") or None
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    state = Path(args.state_dir).absolute()
    jobs_dir, uploads_dir = state / "jobs", state / "uploads"
    retention_s = args.retention_hours * 3600 if args.retention_hours > 0 else None
    try:
        check_args(args)
        from k5.serve.engine import Engine

        engine = Engine.prepare(flags, jobs_dir)  # nothing is made before the flags are known to be good
        state.mkdir(parents=True, exist_ok=True)
        lock = state_lock(state).acquire() if rank == 0 else None
        sock = bind(args.host, args.port) if rank == 0 else None
    except (ValueError, OSError) as e:  # every rank checks the same; rank 0 says why
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return run(args, engine, state, jobs_dir, uploads_dir, retention_s, lock, sock, world)


def run(args, engine, state: Path, jobs_dir: Path, uploads_dir: Path, retention_s, lock, sock, world: int) -> int:
    import torch.distributed as dist

    from k5.launch.logs import Logs
    from k5.launch.signals import StopSignals, stop_exit_code
    from k5.launch.supervisor import init_distributed
    from k5.serve.dispatch import Board, Dispatcher
    from k5.serve.ranks import GroupWorker, make_mailbox

    rank = engine.rank
    if world > 1:
        init_distributed(args.timeout, engine.env.device)
    logs = Logs(rank, state / "logs")
    signals = StopSignals()
    signals.install()
    sup = http = store = None
    code = 1
    try:
        sup = ServeSupervisor(rank, world, args.timeout, logs, signals, engine.env.device)
        if rank == 0:
            from k5.serve.app import Context, create_app
            from k5.serve.store import JobStore

            store = JobStore(state / "jobs.sqlite3", args.max_queue)
            sup.on_fatal = lambda text: requeue_running(state / "jobs.sqlite3", text)
            recover(store, engine, jobs_dir, uploads_dir, args.max_attempts, retention_s)
            board = Board()
            ctx = Context(engine, store, board, jobs_dir, uploads_dir, args.api_key,
                          int(args.max_upload_mb * 2**20), Path(args.lora_dir).absolute() if args.lora_dir else None,
                          args.poll_after_ms, world, lambda: sup.stop_requested)
            http = HttpThread(create_app(ctx), sock).start()
            address = write_address(state, sock, args.host, engine.model_id)
            log.info("k5 serve: listening on %s (state %s); loading %s", address["url"], state, engine.model_id)
        mailbox = make_mailbox(sup)
        t0 = time.perf_counter()
        engine.load(sup)
        if engine.describe:
            log.info(engine.describe)
        log.info("rank %d: loaded in %.1f s (group %d of %d)", rank, time.perf_counter() - t0, engine.group,
                 engine.groups)
        mailbox.add("loaded", 1)
        dispatcher = None
        if rank == 0:
            local = mailbox.client()
            if hasattr(local, "on_put"):
                local.on_put = board.wake.set
            dispatcher = Dispatcher(store, local, board, sup, engine.groups, jobs_dir, uploads_dir, retention_s,
                                    world).start()
        GroupWorker(engine, sup, mailbox, jobs_dir).serve()
        if dispatcher is not None:
            dispatcher.join()
        outcome = sup.finish({"rank": rank, "peak_memory": engine.peak_memory()})
        code = stop_exit_code(outcome.stop_signal) if outcome.stop_signal else 0
        log.info("k5 serve: stopped by %s; queued jobs run at the next start", signals.name)
    except Exception as e:
        if sup is not None:
            sup.fail(e)  # tells the other ranks, requeues the running job (rank 0), ends this process
        raise
    finally:
        signals.restore()
        if http is not None:
            http.stop()
        if sup is not None:
            sup.close()
        if store is not None:
            store.close()
        if rank == 0 and code in (0, 130, 143):
            (state / "server.json").unlink(missing_ok=True)
        logs.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    del lock
    return code


class ServeSupervisor(Supervisor):
    """The CLI's supervisor, with one more duty on rank 0 when a failure ends the server: ``on_fatal`` gets the
    explanation (which names the failed rank) before the process ends, to put the running job back in the queue
    with it."""

    on_fatal = None

    def _explain(self, own):
        text = super()._explain(own)
        if self.on_fatal is not None:
            try:
                self.on_fatal(text)
            except Exception as e:  # the explanation must still be printed
                self.log.error("could not requeue the running job: %s", e)
        return text
