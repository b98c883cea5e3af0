"""Failures end every rank within the timeout and rank 0 names the failed rank: a rank that raises in the middle of
a generation, a rank that dies without a word; plus the pieces (signals, the test hook, classification, the
explanation, per-rank log redirection) checked on their own.

The multi-process tests start the ranks directly (RANK/WORLD_SIZE/MASTER_* as srun or any launcher would set
them), not under torchrun: torchrun's agent kills the other workers of its node when one fails, which would hide
whether the ranks end by themselves, as they must on other nodes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from distributed import hosted_store, store_env
from faults.k5_faults import Injection, child_env
from k5.launch.batch import MANIFEST, read_manifest
from k5.launch.channel import classify, dead_after, explain, find_hung
from k5.launch.logs import Logs
from k5.launch.signals import Stopped, StopSignals
from k5.launch.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"
SIZES = ["--height", "64", "--width", "64", "--num-frames", "1"]


def test_test_hook_parses_and_fires_only_where_asked():
    inj = Injection.parse("rank=1,item=2,step=3")
    assert inj == Injection(rank=1, item=2, step=3, mode="raise")
    inj.fire(rank=0, item=2, first_item=0, step=3)  # another rank
    inj.fire(rank=1, item=1, first_item=0, step=3)  # another item
    inj.fire(rank=1, item=2, first_item=0, step=2)  # another step
    with pytest.raises(RuntimeError, match=r"injected failure \(K5_TEST_FAIL\) at rank 1, item 2, after step 3"):
        inj.fire(rank=1, item=2, first_item=0, step=3)
    with pytest.raises(RuntimeError):  # no item: the rank's first item; no step: after step 1
        Injection.parse("rank=1").fire(rank=1, item=5, first_item=5, step=1)
    with pytest.raises(ValueError, match=r"must look like rank=1,item=0,step=1,mode=raise"):
        Injection.parse("rank=one")


def test_the_shipped_code_has_no_test_hook():
    """The injection lives in tests/faults and wraps the supervisor from outside: production code does not know it
    (tests/test_imports.py checks that no production module reads a test variable)."""
    import k5.launch.supervisor as supervisor

    assert "K5_TEST_FAIL" not in Path(supervisor.__file__).read_text()
    assert not (ROOT / "launch" / "testhook.py").exists()


def test_classify_tells_consequences_from_causes():
    assert classify(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")) \
        == "comm"
    assert classify(dist.DistBackendError("NCCL error in: ... unhandled system error")) == "comm"
    assert classify(RuntimeError("Timed out waiting 60000ms for recv operation to complete")) == "comm"
    assert classify(ValueError("height 100 is not a positive multiple of 16")) == "error"
    assert classify(torch_oom()) == "error"


def torch_oom():
    return RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def record(rank, kind, error, t, where="item 0 (p.txt line 1), after step 2", log=None):
    return {"rank": rank, "kind": kind, "error": error, "where": where, "time": t, "log": log}


def test_explain_puts_the_cause_first():
    records = [
        record(0, "comm", "RuntimeError: Connection closed by peer", 1.0),
        record(3, "error", "RuntimeError: boom", 2.0, log="/job/logs/rank3.log"),
        record(2, "comm", "RuntimeError: Connection reset", 0.5),
    ]
    msg = explain(records)
    lines = msg.splitlines()
    assert lines[0] == "error: rank 3 failed at item 0 (p.txt line 1), after step 2: RuntimeError: boom"
    assert lines[1] == "  its log: /job/logs/rank3.log"
    assert lines[2].startswith("  then: rank 2: RuntimeError: Connection reset; rank 0:")
    dead = explain([record(0, "comm", "closed", 1.0), record(5, "dead", "no heartbeat for 9 s", 2.0)])
    assert dead.startswith("error: rank 5 died at item 0")
    assert explain([record(1, "alive", "", 1.0)]).startswith("error: the job failed without")


def test_sigterm_sets_the_flag_and_the_exit_code():
    signals = StopSignals()
    previous = signal.getsignal(signal.SIGTERM)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not signals.event.is_set() and time.monotonic() < deadline:
            time.sleep(0.001)  # the handler runs between bytecodes of the main thread
        assert signals.event.is_set() and signals.exit_code == 143 and signals.name == "SIGTERM"
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_one_process_stops_at_the_next_step(tmp_path, inject_fault):
    inject_fault("rank=0,item=4,step=2")
    logs = Logs(0, tmp_path)
    signals = StopSignals()
    sup = Supervisor(0, 1, 60.0, logs, signals, device=__import__("torch").device("cpu"))
    try:
        sup.begin_item(3, "item 3 (p.txt line 4)")
        sup.step(0)
        assert sup.where == "item 3 (p.txt line 4), after step 1"
        signals.event.set()
        with pytest.raises(Stopped):
            sup.step(1)
        signals.event.clear()
        sup.begin_item(4, "item 4 (p.txt line 5)")
        sup.step(0)
        with pytest.raises(RuntimeError, match="injected failure"):
            sup.step(1)
    finally:
        sup.close()
        logs.close()


def test_ranks_other_than_0_write_to_their_log_only(tmp_path, capfd):
    logs = Logs(1, tmp_path)
    try:
        os.write(2, b"a C++ warning\n")
        os.write(1, b"a print\n")  # fd 1: what print() writes to outside pytest's capture
        logs.log.info("a log line")
    finally:
        logs.close()
    os.write(2, b"back on the terminal\n")
    captured = capfd.readouterr()
    text = (tmp_path / "rank1.log").read_text()
    assert "a C++ warning" in text and "a print" in text and "rank1 INFO a log line" in text
    assert "a C++ warning" not in captured.err + captured.out and "back on the terminal" in captured.err


def test_dead_after_stays_within_the_timeout():
    for timeout in (4.0, 20.0, 600.0):
        assert dead_after(timeout) <= timeout / 2 + 1e-9 or timeout < 4
    assert dead_after(600.0) == 300.0


# ---- real processes --------------------------------------------------------------------------------------------

def launch_ranks(tmp_path, store, args, hook: str, world: int = 2):
    """The ranks as plain processes meeting at ``store`` (hosted by this test on a port the kernel picked)."""
    procs = []
    for rank in range(world):
        env = child_env(hook, {**os.environ, **store_env(store), "RANK": str(rank), "WORLD_SIZE": str(world),
                               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"})
        out, err = open(tmp_path / f"rank{rank}.out", "w"), open(tmp_path / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen([sys.executable, str(GENERATE), *args], env=env, stdout=out, stderr=err,
                                      cwd=ROOT, start_new_session=True))
    return procs


def wait_all(procs, limit_s: float = 240.0) -> list[tuple[int, float]]:
    """(exit code, exit time) per rank, polled every 20 ms."""
    ended = [None] * len(procs)
    deadline = time.monotonic() + limit_s
    try:
        while None in ended:
            assert time.monotonic() < deadline, "ranks still running"
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = (p.returncode, time.monotonic())
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return ended


def prompts(tmp_path, n=4) -> Path:
    p = tmp_path / "p.txt"
    p.write_text("".join(f"a red fox, take {i}\n" for i in range(n)))
    return p


def test_a_rank_that_raises_mid_generation_ends_every_rank(tmp_path):
    timeout = 20
    out = tmp_path / "job"
    # sequence parallel over both ranks: rank 0 sits in a collective with rank 1 when rank 1 raises
    args = ["--model", "tiny", "--prompts", str(prompts(tmp_path)), "--output-dir", str(out), *SIZES,
            "--steps", "3", "--timeout", str(timeout)]
    with hosted_store() as store:
        (code0, t0), (code1, t1) = wait_all(launch_ranks(tmp_path, store, args, "rank=1,step=2"))
    assert code1 == 1 and code0 == 1
    assert t0 - t1 <= timeout, f"rank 0 ended {t0 - t1:.1f} s after rank 1"
    err0 = (tmp_path / "rank0.err").read_text()
    assert ("error: rank 1 failed at item 0 (" in err0 and ", after step 2: RuntimeError: injected failure "
            "(K5_TEST_FAIL) at rank 1, item 0, after step 2" in err0), err0[-3000:]
    assert f"its log: {out / 'logs' / 'rank1.log'}" in err0
    log1 = (out / "logs" / "rank1.log").read_text()
    assert "Traceback" in log1 and "injected failure" in log1
    assert "injected failure" not in (tmp_path / "rank1.err").read_text()  # the terminal shows rank 0 only
    assert read_manifest(out / MANIFEST).records == []  # the failed item left nothing
    assert not [p.name for p in out.iterdir() if ".partial" in p.name]
    assert err0.strip().splitlines()[-1] == (f"0 item(s) finished in this run; every finished item stays in {out}; "
                                             f"run the same command again to resume")


def test_a_rank_that_dies_silently_ends_every_rank(tmp_path):
    timeout = 8
    out = tmp_path / "job"
    # data parallel: rank 0 works on its own items and shares no collective with rank 1; only the heartbeat can
    # tell it that rank 1 is gone
    args = ["--model", "tiny", "--prompts", str(prompts(tmp_path)), "--output-dir", str(out), *SIZES,
            "--steps", "2", "--dp-degree", "2", "--timeout", str(timeout)]
    with hosted_store() as store:
        (code0, t0), (code1, t1) = wait_all(launch_ranks(tmp_path, store, args, "rank=1,step=1,mode=kill"))
    assert code1 == -signal.SIGKILL and code0 == 1
    assert t0 - t1 <= timeout, f"rank 0 ended {t0 - t1:.1f} s after rank 1 died"
    err0 = (tmp_path / "rank0.err").read_text()
    assert "error: rank 1 died at item 1 (" in err0 and "no heartbeat for" in err0, err0[-3000:]
    records = read_manifest(out / MANIFEST).records
    assert all(r["item"] % 2 == 0 for r in records)  # rank 0's finished items stay recorded, rank 1 wrote nothing
    # the last line counts the items recorded when rank 0 ended (a record is appended before it is counted)
    done, rest = err0.strip().splitlines()[-1].split(" item(s) finished in this run; ")
    assert int(done) <= len(records) and rest == f"every finished item stays in {out}; run the same command again " \
                                                 f"to resume"


def wait_for(path: Path, procs, limit_s: float = 240.0) -> float:
    """Poll (20 ms) until ``path`` exists and return the time; fail if a rank ends first."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        ended = [p.returncode for p in procs if p.poll() is not None]
        assert not ended, f"a rank ended (exit {ended}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {limit_s} s"
        time.sleep(0.02)
    return time.monotonic()


def last_line(path: Path) -> str:
    return path.read_text().strip().splitlines()[-1]


def test_sigterm_to_one_worker_of_a_ulysses_single_video_stops_both(tmp_path):
    # Rank 1 holds after step 1 until the job is asked to stop (the test hook's gate), so the video cannot be
    # finished before the signal, however loaded the machine is. The signal goes to rank 0, which waits for rank 1
    # in the step's stop agreement: rank 1 learns of it through the side channel only.
    out, mark = tmp_path / "out", tmp_path / "holding"
    out.mkdir()
    args = ["--model", "tiny", "--prompt", "a red fox", "--output", str(out / "fox.mp4"), "--save-latents",
            str(out / "fox.safetensors"), *SIZES, "--steps", "3", "--ulysses-degree", "2", "--ring-degree", "1",
            "--timeout", "120"]
    with hosted_store() as store:
        procs = launch_ranks(tmp_path, store, args, f"rank=1,step=1,mode=gate,mark={mark}")
        wait_for(mark, procs)
        procs[0].send_signal(signal.SIGTERM)
        ended = wait_all(procs)
    assert [code for code, _ in ended] == [143, 143], (tmp_path / "rank0.err").read_text()[-3000:]
    # Both stopped at the step's agreement, not by the watchdog after --timeout (which also exits 143, and says so):
    # how soon is not asserted (no timing assertions: a loaded machine took 14 s where an idle one takes 1).
    for rank in (0, 1):
        assert "no safe point within --timeout" not in (tmp_path / f"rank{rank}.err").read_text()
    assert list(out.iterdir()) == []  # no output, no temporary file
    assert last_line(tmp_path / "rank0.err") == "stopped by SIGTERM before the video was finished; nothing was written"


@pytest.mark.parametrize("signalled", [0, 1])
def test_sigterm_to_either_rank_of_a_batch_job_gives_143_on_both(tmp_path, signalled):
    # Data parallel: the two ranks share no collective after loading; the stop reaches the other one through the
    # side channel, and both end with the same code whichever got the signal.
    out, mark = tmp_path / "job", tmp_path / "holding"
    args = ["--model", "tiny", "--prompts", str(prompts(tmp_path)), "--output-dir", str(out), *SIZES,
            "--steps", "2", "--dp-degree", "2", "--timeout", "120"]
    with hosted_store() as store:
        procs = launch_ranks(tmp_path, store, args, f"rank=1,step=1,mode=gate,mark={mark}")
        wait_for(mark, procs)
        procs[signalled].send_signal(signal.SIGTERM)
        ended = wait_all(procs)
    assert [code for code, _ in ended] == [143, 143], (tmp_path / "rank0.err").read_text()[-3000:]
    records = read_manifest(out / MANIFEST).records
    assert 1 not in {r["item"] for r in records}  # rank 1's item in progress was discarded
    assert not [p.name for p in out.iterdir() if ".partial" in p.name]
    for rank in (0, 1):
        assert "stopped by SIGTERM" in (out / "logs" / f"rank{rank}.log").read_text()
    assert last_line(tmp_path / "rank0.err").startswith("stopped by SIGTERM: ")


def test_a_hung_rank_ends_every_rank_within_the_timeout_and_is_named(tmp_path):
    timeout = 15
    mark = tmp_path / "hanging"
    # Sequence parallel: rank 0 waits for rank 1 in the stop agreement after step 2, where rank 1 never arrives.
    args = ["--model", "tiny", "--prompt", "a red fox", "--output", str(tmp_path / "fox.mp4"), *SIZES,
            "--steps", "3", "--ulysses-degree", "2", "--ring-degree", "1", "--timeout", str(timeout)]
    with hosted_store() as store:
        procs = launch_ranks(tmp_path, store, args, f"rank=1,step=2,mode=hang,mark={mark}")
        hung = wait_for(mark, procs)
        ended = wait_all(procs)
    err0 = (tmp_path / "rank0.err").read_text()
    assert [code for code, _ in ended] == [1, 1], err0[-3000:]
    assert max(t for _, t in ended) - hung <= timeout + 5, f"{max(t for _, t in ended) - hung:.1f} s"
    assert "error: rank 1 hung at item 0 (--prompt), after step 2: it never reached" in err0, err0[-3000:]
    assert last_line(tmp_path / "rank0.err") == "nothing was written"
    assert not (tmp_path / "fox.mp4").exists()


def test_ctrl_c_stops_a_single_process_run_with_130(tmp_path):
    out, mark = tmp_path / "out", tmp_path / "holding"
    out.mkdir()
    env = child_env(f"rank=0,step=1,mode=gate,mark={mark}", {**os.environ, "OMP_NUM_THREADS": "1"})
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(GENERATE), "--model", "tiny", "--prompt", "a cat", *SIZES,
                                 "--steps", "2", "--output", str(out / "cat.mp4")], env=env, stderr=err, cwd=ROOT,
                                start_new_session=True)
        wait_for(mark, [proc])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130
    assert list(out.iterdir()) == []
    assert last_line(tmp_path / "err") == "stopped by SIGINT before the video was finished; nothing was written"


def test_find_hung_names_the_rank_its_group_waits_for():
    hb = lambda sync, group=0, state="running": {"n": 1, "state": state, "where": "w", "sync": sync, "group": group}
    assert find_hung({0: hb(5), 1: hb(4)}) == [1]
    assert find_hung({0: hb(4), 1: hb(4)}) == []  # in step: nobody is behind
    assert find_hung({0: hb(5), 1: hb(4, state="exited")}) == [1]  # left because of the failure: still behind
    assert find_hung({0: hb(9, group=0), 1: hb(3, group=1), 2: hb(9, group=0), 3: hb(3, group=1)}) == []  # dp groups
    assert find_hung({0: hb(5), 1: hb(3, state="finished"), 2: None}) == []
