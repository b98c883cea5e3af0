"""k5.serve's pieces without a server: the job store (FIFO within a priority, the bound, all-or-nothing commits,
requeue at the old place, cancel transitions, cursors), the restart rules (k5.serve.server.recover, on a real job
folder written by the CLI's checked path), and the request-field rules of the HTTP layer."""

import math
import time

import pytest
import torch

from k5.serve.fields import APIError, bool_value, int_value, lora_choice, parse_size
from k5.serve.store import JobStore, QueueFull

SPEC = {"request": {"steps": 2, "prompt": "x", "image": None}}


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite3", max_queue=4)
    yield s
    s.close()


def test_fifo_within_priority_and_the_bound(store):
    store.add("a", "video", SPEC, 0, now=1)
    store.add("b", "video", SPEC, 5, now=2)
    store.add("c", "video", SPEC, 0, now=3)
    store.add("d", "video", SPEC, 5, now=4)
    with pytest.raises(QueueFull):
        store.add("e", "video", SPEC)
    assert store.position("b") == 0 and store.position("d") == 1 and store.position("a") == 2
    assert [store.claim_next()["id"] for _ in range(4)] == ["b", "d", "a", "c"]  # priority, then arrival
    assert store.claim_next() is None
    assert store.get("b")["attempts"] == 1 and store.get("b")["status"] == "in_progress"
    # the running ones do not count against the bound; n jobs are committed all or none
    store.add_many([("f", "image", SPEC, 0), ("g", "image", SPEC, 0), ("h", "image", SPEC, 0)])
    with pytest.raises(QueueFull):
        store.add_many([("i", "image", SPEC, 0), ("j", "image", SPEC, 0)])
    assert store.get("i") is None and store.counts() == {"queued": 3, "in_progress": 4, "completed": 0, "failed": 0}


def test_requeue_keeps_the_place_and_counts_only_unclean_ends(store):
    for job in "abc":
        store.add(job, "video", SPEC)
    a = store.claim_next()["id"]
    store.requeue(a, counts=False)  # SIGTERM: not an attempt
    assert store.get(a)["attempts"] == 0 and store.claim_next()["id"] == a  # still first in line
    store.requeue(a, "server_error", "rank 1 died")
    row = store.get(a)
    assert row["attempts"] == 1 and row["error"] == {"code": "server_error", "message": "rank 1 died"}
    store.claim_next()
    store.complete(a, {"files": {}}, retention_s=60, now=100)
    row = store.get(a)
    assert row["status"] == "completed" and row["error"] is None and row["expires_at"] == 160
    assert store.expired(now=159) == [] and store.expired(now=160) == [a]


def test_cancel_transitions_and_cursors(store):
    for job in "abc":
        store.add(job, "video", SPEC)
    assert store.request_cancel("nope") is None
    running = store.claim_next()["id"]
    assert store.request_cancel(running) == "cancelling" and store.cancelling() == [running]
    assert store.request_cancel("b") == "removed" and store.get("b") is None
    store.fail(running, "cancelled", "by DELETE", retention_s=None)
    assert store.request_cancel(running) == "finished"  # the caller removes it with its files
    assert [r["id"] for r in store.list(order="asc")] == ["a", "c"]
    assert [r["id"] for r in store.list(order="desc", limit=1)] == ["c"]
    assert [r["id"] for r in store.list(after="c", order="desc")] == ["a"]
    with pytest.raises(KeyError):
        store.list(after="zzz")


def test_recover_completes_requeues_fails_and_cleans(tmp_path):
    """A restart after a crash: a job whose files and record were published before the crash is completed (not run
    again); a job that left a published file without a record and a temporary file is queued again with both
    deleted; a job that ended the server --max-attempts times fails; an upload no job owns is deleted."""
    from k5.launch.batch import settings as record_settings
    from k5.serve.engine import Engine
    from k5.serve.server import recover

    jobs, uploads = tmp_path / "jobs", tmp_path / "uploads"
    uploads.mkdir()
    engine = Engine.prepare(["--model", "tiny", "--height", "64", "--width", "64", "--num-frames", "5", "--steps",
                             "2"], jobs)  # checks only: no weight loads
    store = JobStore(tmp_path / "jobs.sqlite3", max_queue=8)
    specs = {name: engine.check({"prompt": f"job {name}"}, from_text=False, output=f"{name}.mp4")
             for name in ("done", "half", "tired")}
    for name, spec in specs.items():
        store.add(name, "video", spec)
        store.claim_next()
    store._tx(lambda db: db.execute("UPDATE jobs SET attempts = 3 WHERE id = 'tired'"))
    # "done": published and recorded through the CLI's path, the store never heard
    item = engine._item(specs["done"], "done")
    job = engine._job(specs["done"], jobs / "done", item)
    frames = torch.zeros(5, 64, 64, 3, dtype=torch.uint8)
    latents = torch.zeros(1, 2, 8, 8, 16)
    record = job.dest.write(item, {"video": frames, "latents": latents},
                            {"output": item.output, "settings": record_settings(item, job.settings)})
    # "half": a published video without a record, and a temporary file
    (jobs / "half").mkdir()
    (jobs / "half" / "half.mp4").write_bytes(b"published, never recorded")
    (jobs / "half" / ".half.mp4.x1y2.partial").write_bytes(b"cut short")
    (uploads / "upload_orphan.png").write_bytes(b"never committed")
    recover(store, engine, jobs, uploads, max_attempts=3, retention_s=None)
    done = store.get("done")
    assert done["status"] == "completed" and done["result"]["files"] == record["files"] and done["attempts"] == 1
    half = store.get("half")
    assert half["status"] == "queued"
    assert sorted(p.name for p in (jobs / "half").iterdir()) == [".k5-job.lock", "manifest.jsonl"]
    tired = store.get("tired")
    assert tired["status"] == "failed" and tired["error"]["code"] == "server_error"
    assert "the server ended 3 times while running this job" in tired["error"]["message"]
    assert not (uploads / "upload_orphan.png").exists()
    store.close()


def test_request_field_rules(tmp_path):
    assert parse_size("768x512") == (512, 768) and parse_size(None) is None and parse_size("auto") is None
    for bad in ("768", "axb", "768x512x3", "-1x5"):
        with pytest.raises(APIError, match="'size' must be WIDTHxHEIGHT"):
            parse_size(bad)
    assert bool_value({"m": "true"}, "m") is True and bool_value({"m": "0"}, "m") is False
    assert bool_value({"m": False}, "m") is False and bool_value({}, "m") is None
    with pytest.raises(APIError, match="'m' must be true or false"):
        bool_value({"m": "maybe"}, "m")
    assert int_value({"n": "3"}, "n", 1, 4) == 3
    for bad in ("3.5", 2.5, True, "x"):
        with pytest.raises(APIError, match="'n' must be an integer"):
            int_value({"n": bad}, "n", 1, 4)
    with pytest.raises(APIError, match="between 1 and 4"):
        int_value({"n": 9}, "n", 1, 4)
    # LoRA names come from the folder's listing; nothing a request sends is joined to a path
    (tmp_path / "camera").mkdir()
    (tmp_path / "style.safetensors").write_bytes(b"")
    assert lora_choice("camera:0.5", tmp_path) == ((str(tmp_path / "camera"), 0.5),)
    assert lora_choice(["style.safetensors", "camera"], tmp_path) == (
        (str(tmp_path / "style.safetensors"), 1.0), (str(tmp_path / "camera"), 1.0))
    assert lora_choice("none", tmp_path) == () and lora_choice(None, tmp_path) is None
    for bad in ("../camera", "/etc/passwd", "camera/../../x", "Camera"):
        with pytest.raises(APIError, match="is not one of this server's LoRAs: camera, style.safetensors"):
            lora_choice(bad, tmp_path)
    with pytest.raises(APIError, match="finite"):
        lora_choice(f"camera:{math.inf}", tmp_path)


def test_expired_jobs_lose_their_files_and_rows(tmp_path):
    """The dispatcher's retention round: a job past its expires_at is removed with its folder and its upload; one
    that is not yet is left alone."""
    from types import SimpleNamespace

    from k5.serve.dispatch import Board, Dispatcher
    from k5.serve.ranks import LocalMailbox

    jobs, uploads = tmp_path / "jobs", tmp_path / "uploads"
    store = JobStore(tmp_path / "jobs.sqlite3", max_queue=8)
    for name in ("old", "new"):
        upload = uploads / f"upload_{name}.png"
        upload.parent.mkdir(exist_ok=True)
        upload.write_bytes(b"png")
        (jobs / name).mkdir(parents=True)
        (jobs / name / f"{name}.mp4").write_bytes(b"mp4")
        store.add(name, "video", {"request": {"steps": 1, "prompt": "x", "image": str(upload)}})
        store.claim_next()
    store.complete("old", {"files": {}}, retention_s=10, now=time.time() - 60)  # expired 50 s ago
    store.complete("new", {"files": {}}, retention_s=3600)
    sup = SimpleNamespace(stop_requested=False)
    Dispatcher(store, LocalMailbox(), Board(), sup, 1, jobs, uploads, 3600, 1).expire()
    assert store.get("old") is None and not (jobs / "old").exists() and not (uploads / "upload_old.png").exists()
    assert store.get("new")["status"] == "completed" and (jobs / "new" / "new.mp4").exists()
    assert (uploads / "upload_new.png").exists()
    store.close()
