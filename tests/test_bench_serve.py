"""python -m k5.bench serve: a small run writes its result (the server's overhead per request, requests per minute,
and the CLI comparison labelled NOT MEASURED when skipped), and a failing step ends it with exit 1."""

import json
import subprocess
import sys

from serve_util import ROOT

SMALL = ["-n", "1", "--height", "64", "--width", "64", "--frames", "1", "--steps", "1", "--threads", "1"]


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "k5.bench", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_a_small_run_writes_its_result(tmp_path):
    r = bench(*SMALL, "--no-cli", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    server = result["server"]
    assert result["cli"] == "NOT MEASURED (--no-cli)"
    assert result["targets"]["server_under_half_the_cli"] == "NOT MEASURED"
    assert server["startup_s"] > 0 and server["requests_per_minute"] > 0
    # each request's latency is its generate time plus the overhead: both measured, the overhead positive
    assert 0 < server["overhead_ms"]["min"] <= server["overhead_ms"]["max"]
    assert server["latency_s"]["min"] > server["generate_s"]["min"] > 0
    assert (tmp_path / path.name.replace(".json", ".md")).is_file()


def test_a_failing_step_exits_1(tmp_path):
    r = bench("-n", "1", "--model", str(tmp_path / "no-such-checkpoint"), "--no-save")
    assert r.returncode == 1 and "bench serve: FAILED: CLI run 0 failed" in r.stderr, r.stderr[-3000:]
