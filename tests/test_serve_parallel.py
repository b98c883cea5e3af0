"""`k5 serve` on two ranks (Ulysses 2), started as any launcher starts ranks: what it makes equals the 2-rank CLI's
latents bit for bit (the same code path), a DELETE stops the running job on both ranks at the step boundary they
reach next while the next job runs, and a server killed outright (SIGKILL to every process) mid-job with jobs
queued completes every accepted job exactly once after a restart, keeping what it had finished.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load, load_file

from distributed import hosted_store, store_env
from serve_util import ROOT, TINY, Server, wait_until

PROMPT = "a lighthouse in a storm"
LAYOUT = ["--ulysses-degree", "2", "--ring-degree", "1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve2") / "state",
               [*TINY, *LAYOUT, "--save-latents", "--poll-after-ms", "50", "--timeout", "120"], world=2)
    try:
        yield s.start().wait_ready()
    finally:
        s.close()


def cli_latents(tmp_path, *flags) -> torch.Tensor:
    """`k5 generate` on two ranks of the same layout (one thread each, as the server's ranks)."""
    out = tmp_path / "cli.safetensors"
    with hosted_store() as store:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "k5", "generate", *TINY, *LAYOUT, "--prompt", PROMPT, *flags,
             "--save-latents", str(out)],
            env={**os.environ, **store_env(store), "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                 "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT) for r in range(2)]
        outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    return load_file(out)["latents"]


def test_sdk_on_two_ranks_gives_the_two_rank_clis_latents(server, tmp_path):
    from k5.engine.media.mp4 import check_mp4

    client = server.client()
    video = client.videos.create_and_poll(prompt=PROMPT, extra_body={"seed": 11, "num_inference_steps": 3})
    assert video.status == "completed", video
    path = tmp_path / "served.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    check_mp4(path, 5, 64, 64)
    served = load(client.videos.download_content(video.id, variant="latents").content)["latents"]
    assert torch.equal(served, cli_latents(tmp_path, "--seed", "11", "--steps", "3"))
    record = json.loads((server.state / "jobs" / video.id / "manifest.jsonl").read_text())
    assert record["layout"]["world"] == 2 and record["layout"]["ulysses"] == 2


def test_delete_of_a_running_job_stops_both_ranks_at_the_next_step(server):
    client = server.client()
    server.hold(2)  # both ranks hold after step 2, before the step's stop agreement
    try:
        running = client.videos.create(prompt=PROMPT, extra_body={"num_inference_steps": 50})
        server.wait_progress(running.id, 100 * 2 // 51)
        queued = client.videos.create(prompt="the next one", extra_body={"num_inference_steps": 2})
        deleted = client.videos.delete(running.id)  # answers once the ranks' group has been told
        assert deleted.deleted and deleted.id == running.id
        server.release()
        ended = server.wait_status(running.id)
        assert server.wait_status(queued.id).status == "completed"  # the next job runs on both ranks
    finally:
        server.release()
    assert ended.status == "failed" and ended.error.code == "cancelled", ended
    # both ranks stopped at the first step boundary after the DELETE: not one more step
    for rank in (0, 1):
        assert f"job {running.id}: cancelled after step 2 of 50" in server.log(rank)
    assert not list((server.state / "jobs" / running.id).glob("*.mp4"))  # nothing of it was published


def files_of(server, job_id: str) -> dict:
    """The job's folder checked as the CLI's resume checks a job folder: one intact record, files matching it."""
    from k5.launch.batch import MANIFEST, read_manifest
    from k5.launch.outputs import sha256_file

    folder = server.state / "jobs" / job_id
    state = read_manifest(folder / MANIFEST)
    assert not state.damaged and len(state.records) == 1, (job_id, state)  # exactly once
    assert not [p.name for p in folder.iterdir() if ".partial" in p.name]
    for f in state.records[0]["files"].values():
        assert sha256_file(folder / f["name"]) == f["sha256"]
    return state.records[0]["files"]


def test_sigkill_of_every_server_process_mid_job_then_restart(server, tmp_path):
    from k5.engine.media.mp4 import check_mp4

    client = server.client()
    before = client.videos.create_and_poll(prompt="finished before the kill", extra_body={"num_inference_steps": 1})
    kept = client.videos.download_content(before.id).content
    server.hold(2)
    try:
        running = client.videos.create(prompt=PROMPT, extra_body={"num_inference_steps": 4, "seed": 1})
        server.wait_progress(running.id, 100 * 2 // 5)
        queued = [client.videos.create(prompt=f"queued {i}", extra_body={"num_inference_steps": 2, "seed": i})
                  for i in range(2)]
        assert all(client.videos.retrieve(v.id).status == "queued" for v in queued)
        server.kill()
    finally:
        server.release()
    server.start().wait_ready()
    client = server.client()
    for job in (running, *queued):
        done = server.wait_status(job.id)
        assert done.status == "completed", done
        files = files_of(server, job.id)
        path = tmp_path / f"{job.id}.mp4"
        client.videos.download_content(job.id).write_to_file(path)
        assert path.read_bytes() == (server.state / "jobs" / job.id / files["video"]["name"]).read_bytes()
        check_mp4(path, 5, 64, 64)
    assert client.videos.retrieve(running.id).k5["attempts"] == 2  # the killed run and the one that finished
    assert all(client.videos.retrieve(v.id).k5["attempts"] == 1 for v in queued)
    assert client.videos.download_content(before.id).content == kept  # finished before: still there, unchanged
    files_of(server, before.id)
    listed = [v.id for v in client.videos.list(limit=100)]
    assert len(listed) == len(set(listed))  # no job twice


def stored(server, job_id: str) -> dict:
    """The job's row, read from the state folder while the server is down."""
    from k5.serve.store import JobStore

    store = JobStore(server.state / "jobs.sqlite3", max_queue=1)
    try:
        return store.get(job_id)
    finally:
        store.close()


def test_sigterm_stops_at_a_step_requeues_and_exits_143_on_every_rank(server):
    import signal

    client = server.client()
    server.hold(2)
    try:
        running = client.videos.create(prompt=PROMPT, extra_body={"num_inference_steps": 4})
        server.wait_progress(running.id, 100 * 2 // 5)
        queued = client.videos.create(prompt="queued at the stop", extra_body={"num_inference_steps": 2})
        server.procs[0].send_signal(signal.SIGTERM)  # rank 0 only: rank 1 hears of it through the store
        wait_until(lambda: server.http("GET", "/health")[2] == {"status": "stopping"}, 60, "health: stopping",
                   server.procs)
        status, headers, body = server.http("POST", "/v1/videos", {"prompt": "too late"})
        assert status == 503 and body["error"]["code"] == "server_stopping" and headers["retry-after"]
        assert client.videos.retrieve(running.id).status == "in_progress"  # held mid-job
        server.release()
        codes = server.wait_exit(120)
    finally:
        server.release()
    assert codes == [143, 143], server.output()
    for rank in (0, 1):
        assert f"job {running.id}: stopped (the server is stopping)" in server.log(rank)
    row = stored(server, running.id)
    assert row["status"] == "queued" and row["attempts"] == 0  # a clean stop does not count as an attempt
    assert stored(server, queued.id)["status"] == "queued"
    assert not list((server.state / "jobs" / running.id).glob("*.mp4"))
    server.start().wait_ready()
    for job in (running, queued):
        assert server.wait_status(job.id).status == "completed"
    assert server.client().videos.retrieve(running.id).k5["attempts"] == 1
    files_of(server, running.id)


def test_a_rank_that_dies_ends_the_server_with_its_job_queued(server):
    import signal

    client = server.client()
    server.hold(2)
    try:
        running = client.videos.create(prompt=PROMPT, extra_body={"num_inference_steps": 4})
        server.wait_progress(running.id, 100 * 2 // 5)
        os.kill(server.procs[1].pid, signal.SIGKILL)
        server.release()  # rank 0 goes on to the step's agreement and finds rank 1 gone
        codes = server.wait_exit(120)
    finally:
        server.release()
    assert codes == [1, -signal.SIGKILL], server.output()
    row = stored(server, running.id)
    assert row["status"] == "queued" and row["error"]["code"] == "server_error", row
    assert row["error"]["message"].startswith("rank 1 died at item 0 (request "), row["error"]
    assert "error: rank 1 died" in server.output()
    server.start().wait_ready()
    done = server.wait_status(running.id)
    assert done.status == "completed" and done.error is None and done.k5["attempts"] == 2
    files_of(server, running.id)
