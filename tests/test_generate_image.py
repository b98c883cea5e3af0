"""launch/generate.py on the tiny Image Lite checkpoints (``--model tiny-image``): T2I and I2I.

One process and every layout that runs video: Ulysses 2, ring 2, TP 2 and CFG parallel x 2 (two processes each,
torchrun) give the 1-process latents (fp32, relative L2 error <= 1e-4) and a PNG of the bucket's size whose pixels
differ from the 1-process PNG by at most 1 level (the uint8 rounding of nearly equal decodes; measured under Ulysses
2: latents 4e-7, pixels 1 level). The requests are
at 640x1408, the cheapest bucket (40 x 88 = 3520 tokens = 55 blocks of 64: two sequence ranks pad one block); the
T2I run asks for 600x1400, which is snapped to it with a note. Each task's 1-process run is the reference of all its
layouts. A batch job of edits runs data parallel (dp 2) into NAME.png files with a manifest and resumes.

Bad input (video settings on an image model and the reverse, a task the checkpoint cannot run, an edit without a
source image, a video name for an image) is refused with exit code 2 before any weight loads, and nothing is written.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from k5.launch.generate import main
from numerics import rel_err

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"
COMMON = ["--model", "tiny-image", "--steps", "2", "--seed", "5"]
TASKS = {
    "t2i": ["--prompt", "a lighthouse on a cliff at dusk", "--height", "600", "--width", "1400"],
    "i2i": ["--prompt", "make it night"],  # the size follows the source image: 640x1408
}
LAYOUTS = {
    "ulysses2": ["--ulysses-degree", "2"],
    "ring2": ["--ring-degree", "2"],
    "tp2": ["--tp-degree", "2"],
    "cfg2": ["--cfg-parallel"],
}


def source_image(folder: Path) -> Path:
    path = folder / "source.png"
    if not path.exists():  # 30 x 66: aspect 0.4545, the 640x1408 bucket's
        Image.fromarray((np.random.default_rng(2).random((30, 66, 3)) * 255).astype(np.uint8)).save(path)
    return path


def task_args(task: str, folder: Path) -> list[str]:
    return [*COMMON, *TASKS[task], *(["--image", str(source_image(folder))] if task == "i2i" else [])]


def run_cli(args, nproc=1, timeout=600):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, str(GENERATE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def generate(folder: Path, task: str, name: str, nproc: int = 1, *extra):
    out, lat = folder / f"{name}.png", folder / f"{name}.safetensors"
    r = run_cli([*task_args(task, folder), *extra, "--output", out, "--save-latents", lat], nproc)
    assert r.returncode == 0, r.stderr[-4000:]
    with Image.open(out) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (1408, 640))
        pixels = np.asarray(im)
    return load_file(lat)["latents"], pixels, r.stderr


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    return {task: generate(folder, task, task) for task in TASKS}


def test_one_process(single):
    for task, (latents, pixels, log) in single.items():
        assert latents.shape == (1, 1, 80, 176, 16) and torch.isfinite(latents).all()
        assert pixels.std() > 0  # an image, not a constant
    # T2I: 600x1400 is no bucket: snapped to the nearest in aspect ratio, and said so
    assert "600x1400 is not one of the sizes Image Lite was trained at" in single["t2i"][2]
    assert "using 640x1408" in single["t2i"][2]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_layout_gives_single_process_latents_and_png(tmp_path, single, task, layout):
    latents, pixels, log = generate(tmp_path, task, layout, 2, *LAYOUTS[layout])
    want_latents, want_pixels, _ = single[task]
    assert rel_err(latents, want_latents) <= 1e-4
    assert np.abs(pixels.astype(int) - want_pixels.astype(int)).max() <= 1
    # the summary names the bytes of one denoising step by collective, as for video
    per_step = log.split("sent per denoising step:")[1].splitlines()[0]
    kind = {"ulysses2": "all_to_all", "ring2": "p2p_ring", "tp2": "all_reduce", "cfg2": "all_gather"}[layout]
    assert kind in per_step, per_step


def test_batch_job_of_edits_data_parallel_resumes(tmp_path):
    image = source_image(tmp_path)
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text(json.dumps({"prompt": "make it night", "image": image.name, "output": "night"}) + "\n"
                       + json.dumps({"prompt": "add snow", "image": image.name, "seed": 9}) + "\n")
    out = tmp_path / "job"
    args = [*COMMON, "--prompts", prompts, "--output-dir", out, "--ulysses-degree", "1", "--ring-degree", "1"]
    r = run_cli(args, nproc=2)  # dp 2: one item per group
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["00001.png", "night.png"]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["output"] for r in records) == ["00001.png", "night.png"]
    assert sorted(r["layout"]["dp_group"] for r in records) == [0, 1]
    for rec in records:
        assert rec["files"]["image"]["checked"]["width"] == 1408 and rec["settings"]["request"]["task"] == "i2i"
    again = run_cli(args, nproc=2)
    assert again.returncode == 0 and "nothing to do" in again.stderr


# ---- refused before loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, args, output, match", [
    ("tiny-image", ["--num-frames", "9"], "x.png", r"--num-frames is a video setting .* Image Lite"),
    ("tiny-image", ["--attention", "nabla"], "x.png", r"--attention nabla is a video setting"),
    ("tiny-image", ["--nabla-threshold", "0.5"], "x.png", r"--nabla-threshold is a video setting"),
    ("tiny-image", [], "x.mp4", r"x.mp4.*image.*\.png"),
    ("tiny-image", ["--task", "t2v"], "x.png", r"--task t2v: the tiny model --model tiny-image runs t2i or i2i"),
    ("tiny-image", ["--task", "i2i"], "x.png", r"needs a source image: pass --image"),
    ("tiny-image", ["--magcache"], "x.png", r"--magcache .* none for Image Lite"),
    ("t2i folder", ["--task", "t2v"], "x.png", r"--task t2v makes a video, and this is an Image Lite checkpoint"),
    ("t2i folder", ["--task", "i2i", "--image", "SOURCE"], "x.png", r"text-to-image checkpoint: .* cannot edit"),
    ("tiny", [], "x.png", r"x.png.*video.*\.mp4"),
    ("tiny", ["--task", "t2i"], "x.mp4", r"--task t2i: the tiny model --model tiny runs t2v or i2v"),
    ("video folder", ["--task", "t2i"], "x.mp4", r"--task t2i needs an Image Lite checkpoint"),
])  # fmt: skip
def test_refused_before_loading(capsys, tmp_path, no_loading, model, args, output, match):
    from k5.engine.catalogue.tiny import tiny_checkpoint

    model = {"t2i folder": str(tiny_checkpoint(kind="t2i")), "video folder": str(tiny_checkpoint())}.get(model, model)
    out = tmp_path / "out"
    args = [str(source_image(tmp_path)) if a == "SOURCE" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(["--model", model, "--prompt", "a cat", "--output", str(out / output), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not out.exists()


def test_video_field_in_an_image_prompt_file_is_refused(capsys, tmp_path, no_loading):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "num_frames": 9}\n')
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny-image", "--prompts", str(prompts), "--output-dir", str(tmp_path / "job")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "p.jsonl line 2" in err and "num_frames" in err and "one frame" in err
    assert not (tmp_path / "job").exists()
