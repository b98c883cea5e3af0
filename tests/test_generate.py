"""launch/generate.py end to end on the tiny model, and every bad input it must refuse."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k5.engine.tiny import tiny_checkpoint
from k5.engine.video import probe
from k5.launch.generate import main

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(GENERATE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_tiny_job_writes_playable_mp4_and_latents(tmp_path):
    out, lat, frames = tmp_path / "fox.mp4", tmp_path / "fox.safetensors", tmp_path / "frames.safetensors"
    r = run_cli("--model", "tiny", "--prompt", "a red fox running through snow", "--num-frames", 9,
                "--height", 128, "--width", 192, "--steps", 2, "--output", out, "--save-latents", lat,
                "--save-frames", frames)
    assert r.returncode == 0, r.stderr
    info = probe(out, count_frames=True)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (9, 192, 128, 24.0)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    latents = load_file(lat)["latents"]
    assert latents.shape == (1, 3, 16, 24, 16) and torch.isfinite(latents).all()
    f = load_file(frames)["frames"]
    assert f.shape == (9, 128, 192, 3) and f.dtype == torch.uint8
    assert "s/step" in r.stderr and "peak memory" in r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, lat, frames):  # the umask's permissions, not mkstemp's private 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def expect_refusal(capsys, tmp_path, *args, match):
    out = tmp_path / "never.mp4"
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompt", "a cat", "--output", str(out), *map(str, args)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and match in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("args, match", [
    (["--height", 100], "height 100 is not a positive multiple of 16; try 96"),
    (["--width", 130], "width 130 is not a positive multiple of 16"),
    (["--num-frames", 10], "num_frames 10 is not of the form 4k+1"),
    (["--attention", "nabla", "--height", 144], "height 144 is not a positive multiple of 128"),
    (["--steps", 0], "steps must be at least 1"),
    (["--image", "/nonexistent/cat.png"], "image /nonexistent/cat.png is not a readable file"),
])
def test_bad_request(capsys, tmp_path, args, match):
    expect_refusal(capsys, tmp_path, *args, match=match)


def test_not_a_checkpoint(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")])
    assert e.value.code == 2
    assert "missing component folder(s) transformer, vae" in capsys.readouterr().err


def test_missing_component(capsys, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(), root)
    shutil.rmtree(root / "vae")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(root), "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "missing component folder(s) vae" in err and not (tmp_path / "x.mp4").exists()


def test_existing_output_is_never_overwritten(capsys, tmp_path):
    out = tmp_path / "done.mp4"
    out.write_bytes(b"finished work")
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompt", "a cat", "--output", str(out)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"finished work"


def test_long_prompt_is_truncated_with_a_warning(capsys, tmp_path):
    lat = tmp_path / "l.safetensors"
    prompt = " ".join(["a very long and detailed description of a cat"] * 80)
    assert main(["--model", "tiny", "--prompt", prompt, "--steps", "1", "--num-frames", "1",
                 "--save-latents", str(lat)]) == 0
    assert "truncated" in capsys.readouterr().err
    assert lat.exists()


def test_exit_code_from_the_shell(tmp_path):
    r = run_cli("--model", "tiny", "--prompt", "a cat", "--height", 100, "--output", tmp_path / "x.mp4")
    assert r.returncode == 2 and "height 100" in r.stderr and not (tmp_path / "x.mp4").exists()
