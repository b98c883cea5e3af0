"""torchrun launch/generate.py on the tiny model: every parallel layout gives the 1-process latents and frames.

fp32 throughout; latents within rel L2 1e-4 of the 1-process run; frames of the split VAE decode equal (uint8,
max abs difference <= 1 level allowed for the rounding of nearly-equal latents, measured 0).
"""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from numerics import rel_err

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "tiny", "--prompt", "a lighthouse in a storm", "--height", "128", "--width", "256",
          "--num-frames", "9", "--steps", "2", "--seed", "5"]


def generate(tmp_path, name, nproc, *extra):
    out = tmp_path / f"{name}.safetensors"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    r = subprocess.run([*launcher, str(ROOT / "launch" / "generate.py"), *COMMON, *extra, "--save-latents", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(out)["latents"], r.stderr


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return {att: generate(tmp, att, 1, "--attention", att)[0] for att in ("nabla", "dense")}


@pytest.mark.parametrize("attention, ulysses, ring", [
    ("nabla", 2, 1), ("nabla", 1, 2), ("nabla", 2, 2), ("nabla", 4, 1), ("nabla", 1, 4), ("nabla", 1, 3),
    ("dense", 2, 1), ("dense", 1, 3),
])
def test_layout_gives_single_process_latents(tmp_path, single, attention, ulysses, ring):
    latents, log = generate(tmp_path, "sp", ulysses * ring, "--attention", attention,
                            "--ulysses-degree", str(ulysses), "--ring-degree", str(ring))
    assert rel_err(latents, single[attention]) <= 1e-4
    # the end-of-run summary names the bytes of one denoising step by collective
    per_step = log.split("sent per denoising step:")[1].splitlines()[0]
    assert ("all_to_all" in per_step) == (ulysses > 1) and ("p2p_ring" in per_step) == (ring > 1)


@pytest.mark.parametrize("flags, nproc", [
    (["--tp-degree", "2"], 2),
    (["--tp-degree", "2", "--ulysses-degree", "2"], 4),
    (["--cfg-parallel", "--ulysses-degree", "2"], 4),
    (["--cfg-parallel", "--tp-degree", "2", "--ring-degree", "2"], 8),  # three degrees
])
def test_tp_and_cfg_layouts_give_single_process_latents(tmp_path, single, flags, nproc):
    latents, _ = generate(tmp_path, "tp", nproc, "--attention", "nabla", *flags)
    assert rel_err(latents, single["nabla"]) <= 1e-4


def test_split_vae_decode_gives_single_process_frames(tmp_path):
    frames = {}
    for nproc in (1, 3):
        path = tmp_path / f"frames{nproc}.safetensors"
        _, log = generate(tmp_path, f"l{nproc}", nproc, "--attention", "dense", "--save-frames", str(path))
        frames[nproc] = load_file(path)["frames"]
        if nproc == 3:  # every rank's decode (tiles, time, peak memory) in the end-of-run summary
            for r in range(3):
                assert f"vae rank {r}/3:" in log and "peak" in log.split(f"vae rank {r}/3:")[1].splitlines()[0]
    assert frames[1].shape == (9, 128, 256, 3)
    assert (frames[1].int() - frames[3].int()).abs().max() <= 1
