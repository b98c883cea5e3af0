"""launch/generate.py end to end on the tiny model, and every bad input it must refuse."""

import json
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
    metrics = tmp_path / "run" / "metrics.json"
    r = run_cli("--model", "tiny", "--prompt", "a red fox running through snow", "--num-frames", 9,
                "--height", 128, "--width", 192, "--steps", 2, "--output", out, "--save-latents", lat,
                "--save-frames", frames, "--metrics-json", metrics)
    assert r.returncode == 0, r.stderr
    info = probe(out, count_frames=True)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (9, 192, 128, 24.0)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    latents = load_file(lat)["latents"]
    assert latents.shape == (1, 3, 16, 24, 16) and torch.isfinite(latents).all()
    f = load_file(frames)["frames"]
    assert f.shape == (9, 128, 192, 3) and f.dtype == torch.uint8
    assert "s/step" in r.stderr and "peak memory" in r.stderr
    # the last line names every file written
    assert r.stderr.strip().splitlines()[-1] == f"done: wrote {out}, {lat}, {frames}; metrics: {metrics}"
    m = json.loads(metrics.read_text())
    assert m["status"] == "done" and m["exit_code"] == 0 and m["items"]["finished"] == 1
    assert m["layout"] == {"world": 1, "dp": 1, "cfg": 1, "ring": 1, "ulysses": 1, "tp": 1}
    (item,) = m["per_item"]
    assert len(item["step_s"]) == 2 and all(t > 0 for t in item["step_s"])
    assert set(m["times"]["stages"]) == {"text_s", "denoise_s", "decode_s", "write_s"}
    # guidance 5 runs the conditional and the unconditional forward at each of the 2 steps: 4, worked out by hand
    assert m["dit_forwards"] == {"run": 4, "skipped": 0} and item["dit_forwards"] == {"run": 4, "skipped": []}
    assert item["visual_stack_runs_on_rank"] == 4 and m["variant"] is None and m["magcache"] is False
    rank0 = m["ranks"][0]
    assert rank0["peak_memory"]["bytes"] > 0 and rank0["memory"]["peak_rss_gib"] > 0
    # on the CPU the default is eager: nothing compiled, nothing recompiled
    assert rank0["compile"] == {"compiled": False, "graphs": 0, "recompiles": 0}
    assert m["files"] == [str(out), str(lat), str(frames), str(metrics)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, lat, frames):  # the umask's permissions, not mkstemp's private 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def expect_refusal(capsys, tmp_path, *args, match, output="never.mp4"):
    out = tmp_path / output
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompt", "a cat", "--output", str(out), *map(str, args)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and match in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the write test left nothing
    return err


@pytest.mark.parametrize("env, args, index", [
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["--device", "cuda:1"], 1),
    ({}, ["--nproc-per-node", "2", "--device", "cuda:0"], 0),
])
def test_a_gpu_index_for_several_ranks_is_refused_before_loading(capsys, tmp_path, no_loading, monkeypatch, env,
                                                                 args, index):
    """``--device cuda:N`` with several processes on the machine (torchrun's workers, or --nproc-per-node) would put
    every rank on GPU N, and NCCL says 'Duplicate GPU detected' only after the weights load: refused up front, with
    what is right. No worker starts."""
    from k5.launch import workers

    monkeypatch.setattr(workers, "start_workers", lambda *a: pytest.fail("a worker was started"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    err = expect_refusal(capsys, tmp_path, *args, match=f"error: --device cuda:{index} puts all 2 ranks on this "
                                                        f"machine on GPU {index}")
    assert "use --device cuda, which is cuda:LOCAL_RANK on each rank" in err and len(err.strip().splitlines()) == 1
    if env:  # every torchrun worker refuses; only rank 0 says why
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("LOCAL_RANK", "1")
        with pytest.raises(SystemExit) as e:
            main(["--model", "tiny", "--prompt", "a cat", "--output", str(tmp_path / "x.mp4"), *args])
        assert e.value.code == 2 and capsys.readouterr().err == ""


@pytest.mark.parametrize("args, match", [
    (["--height", 100], "height 100 is not a positive multiple of 16; try 96"),
    (["--width", 130], "width 130 is not a positive multiple of 16"),
    (["--num-frames", 10], "num_frames 10 is not of the form 4k+1"),
    (["--attention", "nabla", "--height", 144], "height 144 is not a positive multiple of 128"),
    (["--steps", 0], "steps must be at least 1"),
    (["--image", "/nonexistent/cat.png"], "image /nonexistent/cat.png is not a readable file"),
])
def test_bad_request(capsys, tmp_path, no_loading, args, match):
    expect_refusal(capsys, tmp_path, *args, match=match)


@pytest.mark.parametrize("args", [
    ["--guidance-scale", "nan"], ["--guidance-scale", "inf"], ["--shift", "nan"], ["--shift", "inf"],
    ["--nabla-threshold", "nan"], ["--timeout", "inf"],
])
def test_non_finite_numbers_are_refused(capsys, tmp_path, no_loading, args):
    # nan guidance ran without guidance and wrote a bare NaN into the manifest; inf guidance and nan shift wrote
    # all-NaN latents and a black video, all with exit 0.
    expect_refusal(capsys, tmp_path, *args, match=f"argument {args[0]}: {args[1]!r} is not a finite number")


@pytest.mark.parametrize("args, output, match", [
    ([], "cat.avi", "--output {out}: k5 writes the video as .mp4 (H.264 MP4 video (24 fps, yuv420p)), not .avi; "
                    "use {stem}.mp4"),
    ([], "cat", "--output {out}: k5 writes the video as .mp4"),
    (["--save-latents", "{dir}/lat.pt"], "never.mp4", "--save-latents {dir}/lat.pt: k5 writes the latents as "
                                                      ".safetensors"),
    (["--save-frames", "{dir}/f.npy"], "never.mp4", "--save-frames {dir}/f.npy: k5 writes the frames as "
                                                    ".safetensors"),
])
def test_output_extension_is_one_we_write(capsys, tmp_path, no_loading, args, output, match):
    out = tmp_path / output
    args = [a.format(dir=tmp_path) for a in args]
    expect_refusal(capsys, tmp_path, *args, output=output,
                   match=match.format(out=out, stem=tmp_path / "cat", dir=tmp_path))


def test_image_that_is_not_an_image_is_refused_before_loading(capsys, tmp_path, no_loading):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    expect_refusal(capsys, tmp_path, "--image", notes, match=f"--image {notes} is not an image file Pillow can read")


@pytest.mark.parametrize("component, pickle", [
    ("transformer", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
    ("text_encoder", "pytorch_model.bin"), ("text_encoder_2", "pytorch_model.bin"),
])
def test_a_pickle_in_any_component_is_refused_before_loading(capsys, tmp_path, no_loading, component, pickle):
    # The released layout with one component's safetensors replaced by a pickle: refused (never unpickled) before
    # any component loads, not after the ones before it did.
    source, root = tiny_checkpoint(), tmp_path / "ckpt"
    root.mkdir()
    for part in source.iterdir():
        if part.name != component:
            (root / part.name).symlink_to(part)
    shutil.copytree(source / component, root / component)
    for f in (root / component).glob("*.safetensors"):
        torch.save(load_file(f), (root / component / pickle))
        f.unlink()
    with pytest.raises(SystemExit) as e:
        main(["--model", str(root), "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    assert f"{root / component} holds {pickle}, a pickle file, and no safetensors" in err, err


def test_a_damaged_safetensors_header_is_refused_before_loading(capsys, tmp_path, no_loading):
    source, root = tiny_checkpoint(), tmp_path / "ckpt"
    shutil.copytree(source, root)
    weights = root / "text_encoder_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut inside the header
    with pytest.raises(SystemExit) as e:
        main(["--model", str(root), "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")])
    assert e.value.code == 2 and f"cannot read safetensors file {weights}" in capsys.readouterr().err


def test_every_flag_has_help_with_its_default():
    from k5.launch.generate import build_parser

    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help"
        assert "default" in action.help or "required" in action.help, f"{action.option_strings}: {action.help}"


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
