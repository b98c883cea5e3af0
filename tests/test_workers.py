"""Multi-process runs from the user's side: ``--nproc-per-node N`` checks the inputs once before it starts any
worker and exits with the workers' own code; under plain torchrun a bad input is reported once, and the workers
exit 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from faults.k5_faults import child_env

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"
SIZES = ["--height", "64", "--width", "64", "--num-frames", "1", "--steps", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_bad_input_is_refused_once_before_any_worker_starts(tmp_path):
    r = subprocess.run([sys.executable, str(GENERATE), "--nproc-per-node", "2", "--model", "tiny", "--prompt", "a cat",
                        "--height", "100", "--output", str(tmp_path / "cat.mp4")], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=ENV)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: height 100 is not a positive multiple of 16; try 96"], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_under_torchrun_a_bad_input_is_one_message_and_the_workers_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(GENERATE), "--model", "tiny", "--prompt", "a cat", "--num-frames", "10", "--output",
                        str(tmp_path / "cat.mp4")], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert r.returncode == 1  # torchrun's own code for any failed worker (README: use --nproc-per-node for 2)
    assert r.stderr.count("error: num_frames 10 is not of the form 4k+1") == 1, r.stderr
    assert "exitcode  : 2" in r.stderr, r.stderr  # torchrun's account of its workers
    assert list(tmp_path.iterdir()) == []


def test_workers_run_a_ulysses_video_and_report_its_metrics(tmp_path):
    video, metrics = tmp_path / "fox.mp4", tmp_path / "metrics.json"
    r = subprocess.run([sys.executable, str(GENERATE), "--nproc-per-node", "2", "--model", "tiny", "--prompt",
                        "a red fox", *SIZES, "--ulysses-degree", "2", "--ring-degree", "1", "--output", str(video),
                        "--metrics-json", str(metrics)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"done: wrote {video}; metrics: {metrics}"
    m = json.loads(metrics.read_text())
    assert m["layout"] == {"world": 2, "dp": 1, "cfg": 1, "ring": 1, "ulysses": 2, "tp": 1}
    assert [rank["rank"] for rank in m["ranks"]] == [0, 1] and all(r["peak_memory"]["bytes"] > 0 for r in m["ranks"])
    (item,) = m["per_item"]
    assert len(item["comm_per_step"]) == 2 and all(step["all_to_all"]["bytes"] > 0 for step in item["comm_per_step"])
    assert m["comm_per_step"] == item["comm_per_step"][-1]


def test_a_stopped_run_exits_with_the_workers_143(tmp_path):
    out, mark = tmp_path / "out", tmp_path / "holding"
    out.mkdir()
    env = child_env(f"rank=1,step=1,mode=gate,mark={mark}", ENV)
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(GENERATE), "--nproc-per-node", "2", "--model", "tiny",
                                 "--prompt", "a red fox", *SIZES, "--ulysses-degree", "2", "--ring-degree", "1",
                                 "--output", str(out / "fox.mp4")], stderr=err, cwd=ROOT, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # to the launcher only: it passes it on to its workers
        assert proc.wait(120) == 143, (tmp_path / "err").read_text()[-3000:]
    assert list(out.iterdir()) == []
