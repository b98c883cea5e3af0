"""`k5 serve` as a command: its help (its own flags and generate's model/layout flags), refusals before anything
loads or binds (exit 2, one message, nothing bound), one server per state folder, and the Slurm script."""

import shlex
import subprocess

import pytest

from serve_util import ROOT
from test_slurm import NO_SLURM


def serve(argv, capsys) -> tuple[int, str]:
    from k5.serve.server import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_help_lists_serve_and_model_flags(capsys):
    from k5.launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--state-dir", "--host", "--port", "--api-key", "--max-queue", "--max-upload-mb", "--retention-hours",
                 "--lora-dir", "--model", "--ulysses-degree", "--cfg-parallel", "--dp-degree", "--steps", "--lora"):
        assert flag in out, flag
    for generate_only in ("--prompts", "--output-dir", "--nproc-per-node", "--save-frames"):
        assert generate_only not in out, generate_only
    assert main(["--help"]) == 0 and "serve" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--max-queue", "0"], "--max-queue 0 must be at least 1"),
    (["--lora-dir", "/nonexistent/loras"], "--lora-dir /nonexistent/loras is not a folder"),
    (["--height", "65"], "height 65 is not a positive multiple of 16; try 64"),  # generate's own check
    (["--model", "tiny", "--magcache"], "--magcache needs the variant's calibrated ratios"),
])
def test_bad_flags_are_refused_before_anything_loads(tmp_path, capsys, no_loading, flags, message):
    code, err = serve(["--model", "tiny", "--state-dir", str(tmp_path / "state"), *flags], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "state").exists()  # nothing made


def test_one_server_per_state_folder(tmp_path, capsys, no_loading):
    from k5.serve.server import state_lock

    (tmp_path / "state").mkdir()
    held = state_lock(tmp_path / "state").acquire()  # as a running server's rank 0 holds it
    code, err = serve(["--model", "tiny", "--state-dir", str(tmp_path / "state")], capsys)
    assert code == 2 and f"another k5 serve uses {tmp_path / 'state'}" in err
    del held


def test_slurm_script_runs_k5_serve(tmp_path):
    env = {**NO_SLURM, "K5_DRY_RUN": "1", "K5_NNODES": "2", "K5_GPUS_PER_NODE": "4", "K5_MASTER_ADDR": "node01"}
    r = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / "serve.sbatch"), "--model", "/models/lite",
                        "--state-dir", "/shared/serve", "--host", "0.0.0.0"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert cmd[:2] == ["srun", "--nodes=2"] and "--nproc-per-node=4" in cmd
    assert cmd[-9:] == ["-m", "k5", "serve", "--model", "/models/lite", "--state-dir", "/shared/serve", "--host",
                        "0.0.0.0"]


def test_servers_that_take_images_are_checked_with_one(tmp_path, no_loading):
    """`--task i2v` and an edit-capable Image Lite server are checked at start with a placeholder image (generate
    refuses them without one); their requests then need their own."""
    from PIL import Image

    from k5.serve.engine import Engine

    source = tmp_path / "cat.png"
    Image.new("RGB", (96, 64), (10, 20, 30)).save(source)
    i2v = Engine.prepare(["--model", "tiny", "--task", "i2v", "--height", "64", "--width", "64"], tmp_path / "a")
    with pytest.raises(ValueError, match="--task i2v needs an image to animate"):
        i2v.check({"prompt": "a cat"}, from_text=False, output="x.mp4")
    spec = i2v.check({"prompt": "a cat"}, from_text=False, image=str(source), output="x.mp4")
    assert spec["request"]["image"] == str(source) and spec["size"] == "80x48"  # the image's aspect, area 64x64
    edits = Engine.prepare(["--model", "tiny-image"], tmp_path / "b")
    assert edits.edits and edits.model_id == "tiny-image/i2i"
    assert edits.check({"prompt": "night"}, from_text=False, image=str(source), task="i2i",
                       output="x.png")["request"]["task"] == "i2i"
    assert edits.check({"prompt": "a fox"}, from_text=False, task="t2i", output="y.png")["size"] == "1024x1024"
    text_only = Engine.prepare(["--model", "tiny-image", "--task", "t2i"], tmp_path / "c")
    assert not text_only.edits and text_only.model_id == "tiny-image/t2i"
    with pytest.raises(ValueError, match="cannot edit"):
        text_only.check({"prompt": "night"}, from_text=False, image=str(source), task="i2i", output="x.png")
