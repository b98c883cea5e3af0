"""Batch jobs: the manifest, resume and the deal, then real torchrun jobs killed with SIGTERM and SIGKILL after
their first items, rerun, and checked: the rest is produced, finished files are untouched (same bytes and
modification time) and the manifest has each item exactly once."""

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from faults.k5_faults import child_env
from k5.engine.pipelines.video import Request
from k5.launch.batch import (MANIFEST, JobLock, check_resume, deal, is_sealed, prepare, read_manifest, seal,
                             settings, write_item)
from k5.launch.outputs import append_line, sha256_file
from k5.launch.prompts import Item

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"
JOB = {"model": "tiny", "dtype": "fp32", "attention": "auto", "nabla_threshold": None, "save_latents": False}


def item(i: int, output: str | None = None, **request) -> Item:
    req = Request(**{"prompt": f"prompt {i}", "height": 16, "width": 16, "num_frames": 1, "steps": 1, "seed": i,
                     **request})
    return Item(i, i + 1, "p.txt", req, output or f"{i:05d}.mp4")


def finish(out: Path, it: Item, job=JOB, shade: int = 0) -> dict:
    """Write an item through the real write path (temporary file, publish, record)."""
    frames = torch.full((1, 16, 16, 3), shade, dtype=torch.uint8)
    latents = torch.full((1, 1, 2, 2, 16), float(shade)) if job["save_latents"] else None
    return write_item(out, it, frames, latents, {"item": it.index, "output": it.output, "settings": settings(it, job)})


def snapshot(out: Path, names) -> dict:
    return {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in names}


def test_seal_detects_any_change():
    line = seal({"output": "a.mp4", "files": {"video": {"bytes": 3}}})
    record = json.loads(line)
    assert is_sealed(record)
    record["files"]["video"]["bytes"] = 4
    assert not is_sealed(record)
    assert not is_sealed({"output": "a.mp4"})


def _append_many(path: str, tag: str, n: int) -> None:
    for i in range(n):
        append_line(path, seal({"writer": tag, "i": i, "pad": tag * 6000}))  # > one page: a torn write would show


def test_concurrent_appends_stay_whole_lines(tmp_path):
    # Two dp-group leaders append at the same time; every line must come out whole (fork is safe here: the
    # children only write files).
    path = str(tmp_path / MANIFEST)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, tag, 150)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    state = read_manifest(Path(path))
    assert state.damaged == [] and len(state.records) == 300
    for tag in "ab":
        assert [r["i"] for r in state.records if r["writer"] == tag] == list(range(150))


def test_prepare_keeps_finished_work_and_clears_what_a_kill_left(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    items = [item(i) for i in range(5)]
    for it in items[:3]:
        finish(out, it, shade=10 * it.index)
    finish(out, item(9, "other.mp4"))  # another prompt file's item in the same folder: not ours to judge
    before = snapshot(out, ["00000.mp4", "00001.mp4", "other.mp4"])
    # What kills leave: a truncated finished file, a published file without its record, a temporary file and a
    # record cut short in the middle of its write.
    with open(out / "00002.mp4", "r+b") as f:
        f.truncate(10)
    (out / "00003.mp4").write_bytes(b"published, never recorded")
    (out / ".00004.mp4.k3j2.partial").write_bytes(b"half a video")
    with open(out / MANIFEST, "ab") as f:
        f.write(seal({"item": 4, "output": "00004.mp4"}).encode()[:50])

    plan = prepare(items, out, JOB)
    assert plan.pending == [2, 3, 4] and plan.finished == 2
    assert sorted(p.name for p in out.iterdir()) == ["00000.mp4", "00001.mp4", MANIFEST, "other.mp4"]
    assert snapshot(out, ["00000.mp4", "00001.mp4", "other.mp4"]) == before
    state = read_manifest(out / MANIFEST)
    assert state.damaged == [] and state.ends_with_newline
    assert [r["output"] for r in state.records] == ["00000.mp4", "00001.mp4", "other.mp4"]
    # the redone item appends after the repaired manifest
    finish(out, items[2])
    assert [r["output"] for r in read_manifest(out / MANIFEST).records][-1] == "00002.mp4"
    assert prepare(items, out, JOB).pending == [3, 4]


def test_verify_by_checksum_catches_a_changed_byte(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    it = item(0)
    record = finish(out, it)
    data = bytearray((out / it.output).read_bytes())
    data[-1] ^= 0xFF
    (out / it.output).write_bytes(bytes(data))
    assert sha256_file(out / it.output) != record["files"]["video"]["sha256"]
    assert prepare([it], out, JOB, verify="size").pending == []  # same size: the cheap check trusts it
    assert prepare([it], out, JOB, verify="checksum").pending == [0]
    assert not (out / it.output).exists()


def test_a_recorded_video_that_does_not_play_is_redone(tmp_path):
    # What a k5 that trusted ffmpeg's exit status could record after a full disk: a video cut short, recorded with
    # the size and sha256 of the cut file. Its checksum matches; decoding it shows it is not the video asked for.
    out = tmp_path / "job"
    out.mkdir()
    good, cut = item(0), item(1)
    records = [finish(out, good), finish(out, cut)]
    data = (out / cut.output).read_bytes()
    (out / cut.output).write_bytes(data[: len(data) // 2])
    old_style = []
    for it, record in zip((good, cut), records):
        data = (out / it.output).read_bytes()
        files = {"video": {"name": it.output, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
        old_style.append(seal({**record, "files": files}))  # no "checked": recorded without a check
    (out / MANIFEST).write_text("".join(line + "\n" for line in old_style))
    plan = prepare([good, cut], out, JOB)
    assert plan.pending == [1] and plan.finished == 1
    assert any("00001.mp4 was recorded but is not valid" in note for note in plan.notes), plan.notes
    assert (out / good.output).exists() and not (out / cut.output).exists()


def test_resume_refuses_other_settings_and_foreign_files(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    finish(out, item(0))
    with pytest.raises(ValueError, match=r"00000.mp4 \(p.txt line 1\) was made with request.steps 1 \(this run: 2\)"):
        check_resume([item(0, steps=2)], out, JOB)
    with pytest.raises(ValueError, match=r"save_latents False \(this run: True\)"):
        check_resume([item(0)], out, {**JOB, "save_latents": True})
    check_resume([item(0), item(1)], out, JOB)  # same settings, one more item: fine
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "00001.mp4").write_bytes(b"someone's video")
    with pytest.raises(ValueError, match=r"00001.mp4 exists but .* has no manifest.jsonl"):
        check_resume([item(0), item(1)], foreign, JOB)


def test_deal_is_by_index_and_survives_a_resume():
    assert deal(list(range(10)), 3, 0) == [0, 3, 6, 9]
    assert deal(list(range(10)), 3, 2) == [2, 5, 8]
    first = {g: deal(list(range(10)), 3, g) for g in range(3)}
    remaining = [1, 2, 4, 7, 8, 9]  # what a killed job left
    for g in range(3):
        assert deal(remaining, 3, g) == [i for i in first[g] if i in remaining]


def test_second_job_on_the_same_folder_is_refused(tmp_path):
    lock = JobLock(tmp_path).acquire()
    with pytest.raises(ValueError, match=r"another job is writing to .* \(pid \d+ on .*\)"):
        JobLock(tmp_path).acquire()
    lock.release()
    JobLock(tmp_path).acquire().release()


# ---- real jobs, killed ------------------------------------------------------------------------------------------

ITEMS = 12
SIZES = ["--height", "64", "--width", "64", "--num-frames", "1", "--steps", "2"]


def prompt_file(tmp_path) -> Path:
    # items 0 and 1 ask for the same video and go to different dp groups: their latents must be equal
    lines = [{"prompt": "a lighthouse in a storm", "seed": 7}, {"prompt": "a lighthouse in a storm", "seed": 7}]
    lines += [{"prompt": f"a red fox, take {i}"} for i in range(2, ITEMS)]
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(GENERATE), *args]


def start(cmd, tmp_path, name, env=None):
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True,
                            env={**os.environ, **(env or {})})


def hold(mark: Path) -> dict:
    """The test hook's gate: rank 1 holds after step 1 of item 5 until the job is asked to stop, and creates
    ``mark`` when it starts to. By then it has finished items 1 and 3, and items 5, 7, 9 and 11 cannot be finished
    before the signal: the job is stopped part-way whatever the machine's load."""
    return child_env(f"rank=1,item=5,step=1,mode=gate,mark={mark}")


def wait_for_mark(mark: Path, proc, limit_s: float = 240.0) -> None:
    deadline = time.monotonic() + limit_s
    while not mark.exists():
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before rank 1 reached item 5"
        assert time.monotonic() < deadline, f"rank 1 did not reach item 5 within {limit_s} s"
        time.sleep(0.02)


def signal_everything(proc, sig) -> None:
    """What Slurm does to a job step: the signal goes to every process, torchrun, its workers (each in a session
    of its own) and their ffmpeg children, at once."""
    tree = [psutil.Process(proc.pid)]
    tree += tree[0].children(recursive=True)
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def finished_files(out: Path) -> dict:
    state = read_manifest(out / MANIFEST)
    assert state.damaged == []
    names = [f["name"] for r in state.records for f in r["files"].values()]
    for r in state.records:
        for f in r["files"].values():
            assert (out / f["name"]).stat().st_size == f["bytes"] and sha256_file(out / f["name"]) == f["sha256"]
    assert not [p.name for p in out.iterdir() if ".partial" in p.name]
    return snapshot(out, names)


def check_complete(out: Path, before: dict) -> list[dict]:
    records = read_manifest(out / MANIFEST).records
    assert sorted(r["item"] for r in records) == list(range(ITEMS))  # each item exactly once
    after = finished_files(out)
    for name, (data, mtime) in before.items():
        assert after[name] == (data, mtime), f"{name} was touched by the rerun"
    return records


def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path):
    prompts, out = prompt_file(tmp_path), tmp_path / "job"
    cmd = torchrun("--model", "tiny", "--prompts", str(prompts), "--output-dir", str(out), *SIZES,
                   "--dp-degree", "2", "--save-latents", "--timeout", "60")
    proc = start(cmd, tmp_path, "first", hold(tmp_path / "holding"))
    wait_for_mark(tmp_path / "holding", proc)
    signal_everything(proc, signal.SIGTERM)
    assert proc.wait(60) != 0
    before = finished_files(out)
    done = len(read_manifest(out / MANIFEST).records)
    assert 2 <= done <= ITEMS - 4, f"{done} of {ITEMS} items finished"  # rank 1 held at item 5 of 1, 3, 5, ...
    for rank in (0, 1):  # both ranks took the clean way out, not a crash
        assert "stopped by SIGTERM" in (out / "logs" / f"rank{rank}.log").read_text()

    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = check_complete(out, before)
    assert f"{ITEMS - done} of {ITEMS} item(s) to do ({done} finished before)" in rerun.stderr
    assert all(r["layout"]["dp_group"] == r["item"] % 2 and r["layout"]["dp"] == 2 for r in records)
    by_item = {r["item"]: r for r in records}
    lat = [load_file(out / by_item[i]["files"]["latents"]["name"])["latents"] for i in range(3)]
    # Same request on the two dp groups, possibly in two runs: one process each, the same files and threads, so the
    # same computation.
    assert torch.equal(lat[0], lat[1])
    assert not torch.equal(lat[0], lat[2])
    # the terminal shows rank 0 only: rank 1's items are in its log, not on the screen
    rank1 = (out / "logs" / "rank1.log").read_text()
    assert "take 3" in rank1 and "take 3" not in rerun.stderr + (tmp_path / "first.err").read_text()


def test_sigkill_leftovers_are_cleaned_and_the_rerun_finishes(tmp_path):
    prompts, out = prompt_file(tmp_path), tmp_path / "job"
    args = ["--model", "tiny", "--prompts", str(prompts), "--output-dir", str(out), *SIZES, "--timeout", "60"]
    proc = start(torchrun(*args, "--dp-degree", "2"), tmp_path, "first", hold(tmp_path / "holding"))
    wait_for_mark(tmp_path / "holding", proc)
    signal_everything(proc, signal.SIGKILL)
    proc.wait(60)
    state = read_manifest(out / MANIFEST)
    done = {r["output"] for r in state.records}
    assert 2 <= len(done) <= ITEMS - 4
    before = snapshot(out, sorted(done))
    # A SIGKILL can land anywhere; make sure the worst places are covered whatever this one hit: a temporary file,
    # a published video whose record was never appended, and a record cut off in the middle.
    pending = sorted(f"{i:05d}.mp4" for i in range(ITEMS) if f"{i:05d}.mp4" not in done)
    (out / f".{pending[0]}.x1y2.partial").write_bytes(b"half")
    (out / pending[1]).write_bytes(b"published but not recorded")
    with open(out / MANIFEST, "ab") as f:
        f.write(b'{"item": 11, "output": "00011.mp4", "files": {"vid')

    # resumed on one process: a different layout finishes the same job (one thread, as torchrun gives each worker)
    rerun = subprocess.run([sys.executable, str(GENERATE), *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_complete(out, before)
    assert f"removed leftover temporary file .{pending[0]}.x1y2.partial" in rerun.stderr
    assert f"removed {pending[1]}: not a finished item" in rerun.stderr
    assert "dropped damaged line" in rerun.stderr
