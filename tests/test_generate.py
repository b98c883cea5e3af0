"""launch/generate.py end to end on the tiny model, and every bad input it must refuse."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.engine.media.mp4 import probe
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
    # stderr is a pipe here, as in a Slurm log: no bars (neither ours nor a library's), a plain line per tenth of the
    # steps instead; with 2 steps each step ends a tenth, and the rate needs two step ends
    assert "\r" not in r.stderr and "Loading weights" not in r.stderr and "denoising" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert [line for line in lines if line.startswith("item 0: step")][:1] == ["item 0: step 1/2 (50%)"], r.stderr
    assert [re.sub(r"[\d.e+-]+ s/step", "X s/step", line) for line in lines if line.startswith("item 0: step 2/")] == [
        "item 0: step 2/2 (100%), X s/step"], r.stderr
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
    check_readme_describes_metrics(m)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, lat, frames):  # the umask's permissions, not mkstemp's private 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def readme_metrics_fields() -> dict[str, tuple[list[str], str]]:
    """The README's metrics table: field (``name`` or ``name[]`` for a list of objects) -> (its position, the
    names written in backticks in its description)."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- metrics fields:")[1].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[3:]:
        field, what = line.strip("|").split(" | ", 1)
        for name in re.findall(r"`([^`]+)`", field):
            rows[name] = re.findall(r"`([a-z_0-9]+)`", what)
    return rows


def check_readme_describes_metrics(doc: dict) -> None:
    """The README names every field of a real run's metrics.json as written, and the sub-fields of every object (and
    of the objects in a list) one level down, and of ``times.stages``; and no field that the document does not have.
    Fields that appear only with a feature (LoRA, prompt expansion, CUDA, several items' kinds) are the exception
    the other way: named though absent here."""
    rows = readme_metrics_fields()
    names = [n.removesuffix("[]") for n in rows]
    assert names == list(doc), "README metrics table fields (in order) != the JSON's top-level keys"
    for name, subfields in rows.items():
        value = doc[name.removesuffix("[]")]
        if name.endswith("[]"):
            assert isinstance(value, list) and value and all(isinstance(v, dict) for v in value), name
            value = value[0]
        if isinstance(value, dict):
            missing = [k for k in value if k not in subfields]
            assert not missing, f"README metrics: {name} does not name {missing}"
            for k, v in value.items():
                if isinstance(v, dict):
                    assert not [s for s in v if s not in subfields], f"README metrics: {name}.{k} misses a field"
    fixed = {"layout", "items", "times", "dit_forwards"}  # always the same fields: the README names no others
    for name in fixed:
        value = doc[name]
        known = set(value) | {k for v in value.values() if isinstance(v, dict) for k in v}
        assert set(rows[name]) <= known, f"README metrics: {name} names fields it does not have: " \
                                         f"{sorted(set(rows[name]) - known)}"


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


def test_help_names_the_k5_command_and_every_model_kind():
    from k5.launch.generate import build_parser

    p = build_parser()
    text = p.format_help()
    model = next(a for a in p._actions if a.dest == "model")
    assert "'tiny'" in model.help and "'tiny-image'" in model.help, model.help
    # the examples use the installed command (the script path works too, and the README's quick start keeps it)
    assert "launch/generate.py" not in text
    assert '    k5 generate --model M --prompt "a cat" --output cat.mp4' in text
    assert "    torchrun --nproc_per_node=8 -m k5 generate --model M" in text


def test_a_first_run_loads_no_test_peer_and_draws_no_library_bar(tmp_path):
    """deepspeed is a test peer: a run must not import it (its import prints "Setting accelerator to CPU"). The first
    run of a tiny model also writes the checkpoint, through transformers' save_pretrained, which probes for deepspeed;
    a new K5_TINY_CACHE makes this run the first."""
    code = ("import sys; from k5.launch.cli import main; code = main(sys.argv[1:]); "
            "print('deepspeed modules:', sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed')); "
            "sys.exit(code)")
    lat = tmp_path / "l.safetensors"
    r = subprocess.run([sys.executable, "-c", code, "generate", "--model", "tiny", "--prompt", "a cat", "--steps", "1",
                        "--num-frames", "1", "--save-latents", str(lat)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300, env={**os.environ, "K5_TINY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert any((tmp_path / "cache").iterdir()) and lat.exists()  # the checkpoint was built in this run
    assert "deepspeed modules: []" in r.stdout, r.stdout[:300]
    assert "Setting accelerator" not in r.stderr and "Loading weights" not in r.stderr, r.stderr
    assert "item 0: step 1/1 (100%)" in r.stderr.splitlines(), r.stderr


def test_a_mistyped_repo_id_gets_the_closest_catalogue_names(capsys, tmp_path, no_loading, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    right = "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    typo = right[:-1]
    with pytest.raises(SystemExit) as e:
        main(["--model", typo, "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"did you mean {right} (or " in err, err
    assert re.findall(r"download ([^\s)]+)", err) == [right, right], err  # hf and huggingface-cli, never the typo
    assert not (tmp_path / "x.mp4").exists()


def test_an_output_that_is_a_folder_is_named_as_one(capsys, tmp_path, no_loading):
    folder = tmp_path / "videos"
    folder.mkdir()
    for flags, want in [(["--output", str(folder)], f"--output {folder} is a folder; give a file name ({folder}/"
                                                    f"NAME.mp4 for a video, {folder}/NAME.png for an image), or "
                                                    f"--output-dir {folder} to make it a job folder"),
                        (["--save-latents", str(folder)], f"--save-latents {folder} is a folder; give a file name "
                                                          f"such as {folder}/NAME.safetensors\n"),
                        (["--output", str(tmp_path / "x.mp4"), "--metrics-json", str(folder)],
                         f"--metrics-json {folder} is a folder; give a file name such as {folder}/metrics.json\n")]:
        with pytest.raises(SystemExit) as e:
            main(["--model", "tiny", "--prompt", "a cat", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("error:") == 1 and want in err, err
        assert "never overwritten" not in err and "extension" not in err
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())


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
