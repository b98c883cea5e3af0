"""launch/slurm/generate.sbatch: the syntax, the command it builds from a Slurm environment and outside one
(K5_DRY_RUN=1, compared with the command written out by hand), its refusals, and one real run through it with srun
replaced by a stand-in that runs the task on this machine."""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from k5.launch.batch import MANIFEST, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "slurm" / "generate.sbatch"
NO_SLURM = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "K5_"))}


def fake_bin(tmp_path, name: str, body: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return folder


def sbatch(env: dict, *args, path_dirs=()):
    env = {**NO_SLURM, **env, "PATH": os.pathsep.join([*map(str, path_dirs), NO_SLURM.get("PATH", "")])}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


def test_syntax():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_NUM_NODES": "4",
         "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT)}


def test_dry_run_builds_srun_and_torchrun_from_the_slurm_environment(tmp_path):
    scontrol = fake_bin(tmp_path, "scontrol", 'echo gpu07; echo gpu08; echo gpu09; echo gpu10\n')
    prompt = "a cat's \"hat\"; $(rm -rf /) & more"
    r = sbatch({**SLURM, "K5_DRY_RUN": "1", "SLURM_RESTART_COUNT": "2"}, "--model", "/models/pro", "--prompt",
               prompt, "--output-dir", "/scratch/job 1", path_dirs=[scontrol])
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == [
        "srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpu-bind=none", "--export=ALL",
        str(ROOT / ".venv" / "bin" / "torchrun"), "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu07:29500", "--rdzv-id=4242-2", "--max-restarts=0",
        str(ROOT / "launch" / "generate.py"), "--model", "/models/pro", "--prompt", prompt, "--output-dir",
        "/scratch/job 1",
    ]


def test_dry_run_overrides_and_a_plain_node_list():
    env = {**SLURM, "SLURM_JOB_NODELIST": "nodeA,nodeB", "SLURM_JOB_NUM_NODES": "2", "K5_DRY_RUN": "1",
           "K5_GPUS_PER_NODE": "4", "K5_MASTER_PORT": "31337", "K5_TORCHRUN": "/opt/venv/bin/torchrun",
           "K5_SCONTROL": "/nonexistent/scontrol"}
    r = sbatch(env, "--model", "tiny")  # without scontrol: the first name of a plain list
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert "--rdzv-endpoint=nodeA:31337" in cmd and "--nproc-per-node=4" in cmd and "--nnodes=2" in cmd
    assert "/opt/venv/bin/torchrun" in cmd and "--rdzv-id=4242-0" in cmd


def test_dry_run_outside_an_allocation():
    # No SLURM_* variable at all (NO_SLURM drops them): the defaults of the script's #SBATCH lines, this host.
    r = sbatch({"K5_DRY_RUN": "1"}, "--model", "tiny")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    host = socket.gethostname()
    assert cmd[:13] == [
        "srun", "--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpu-bind=none", "--export=ALL",
        str(ROOT / ".venv" / "bin" / "torchrun"), "--nnodes=1", "--nproc-per-node=8", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:29500", "--rdzv-id=dry-run-0", "--max-restarts=0"]
    assert "dry run outside a Slurm allocation: 1 node(s) (K5_NNODES) x 8 GPU(s)" in r.stderr
    # the shape and the rendezvous host from the environment; no scontrol anywhere on PATH
    r = sbatch({"K5_DRY_RUN": "1", "K5_NNODES": "4", "K5_GPUS_PER_NODE": "2", "K5_MASTER_ADDR": "node07",
                "K5_SCONTROL": "/nonexistent/scontrol"}, "--model", "tiny")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert {"--nodes=4", "--nnodes=4", "--nproc-per-node=2", "--rdzv-endpoint=node07:29500"} <= set(cmd)


def test_master_addr_is_taken_before_scontrol_is_needed():
    # A bracketed node list needs scontrol to expand, unless K5_MASTER_ADDR says where the rendezvous is.
    env = {**SLURM, "K5_DRY_RUN": "1", "K5_SCONTROL": "/nonexistent/scontrol", "K5_MASTER_ADDR": "gpu09"}
    r = sbatch(env, "--model", "tiny")
    assert r.returncode == 0, r.stderr
    assert "--rdzv-endpoint=gpu09:29500" in shlex.split(r.stdout)


def test_scontrol_output_longer_than_one_line_is_read_whole(tmp_path):
    # `scontrol ... | head -n 1` under pipefail failed with SIGPIPE (141) when scontrol wrote after head had quit.
    scontrol = fake_bin(tmp_path, "scontrol", 'echo gpu07\nfor i in $(seq 1 20000); do echo gpu$i; done\n')
    r = sbatch({**SLURM, "K5_DRY_RUN": "1"}, "--model", "tiny", path_dirs=[scontrol])
    assert r.returncode == 0, r.stderr
    assert "--rdzv-endpoint=gpu07:29500" in shlex.split(r.stdout)


@pytest.mark.parametrize("env, message", [
    ({"K5_DRY_RUN": "0"}, "SLURM_JOB_ID / SLURM_JOB_NODELIST are not set: submit with sbatch"),
    ({"K5_NNODES": "two"}, "node count 'two' is not a positive integer"),
    ({**SLURM, "SLURM_GPUS_ON_NODE": ""}, "no GPU count: request GPUs (--gpus-per-node) or set K5_GPUS_PER_NODE"),
    ({**SLURM, "K5_SCONTROL": "/nonexistent/scontrol"},
     "cannot expand the node list 'gpu[07-10]' without scontrol; set K5_MASTER_ADDR"),
    ({**SLURM, "K5_ROOT": "/nonexistent"}, "/nonexistent/launch/generate.py not found"),
])
def test_refusals(env, message):
    r = sbatch({"K5_DRY_RUN": "1", **env}, "--model", "tiny")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_a_real_run_through_the_script(tmp_path):
    # srun stand-in: drop srun's options and run the one task of this one-node job here.
    srun = fake_bin(tmp_path, "srun", 'while [[ $1 == --* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n')
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a red fox, take {i}"}) + "\n" for i in range(2)))
    out = tmp_path / "job"
    # rendezvous port 0: the c10d store binds a port the kernel picks and torchrun hands that one to the workers
    # (what --standalone does), so no port is chosen here that another process could take first.
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_GPUS_ON_NODE": "2", "SLURM_SUBMIT_DIR": str(ROOT), "K5_MASTER_PORT": "0",
           "K5_TORCHRUN": str(Path(sys.executable).parent / "torchrun")}
    r = sbatch(env, "--model", "tiny", "--prompts", str(prompts), "--output-dir", str(out), "--height", "64",
               "--width", "64", "--num-frames", "1", "--steps", "2", "--dp-degree", "2", path_dirs=[srun])
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_manifest(out / MANIFEST).records
    assert sorted(r["item"] for r in records) == [0, 1]
    assert {r["item"]: r["layout"]["dp_group"] for r in records} == {0: 0, 1: 1}
    assert (out / "logs" / "rank1.log").exists()
