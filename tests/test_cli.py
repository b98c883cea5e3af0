"""The public API and the commands: `from k5 import ...`, `python -m k5`, the `k5` console script of an installed
wheel, `k5 variants`, and the README's catalogue table and Python example (run here, so they cannot rot)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k5.engine.catalogue import variants as V
from k5.launch import catalogue, cli

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model", "tiny", "--prompt", "a lighthouse in a storm", "--height", "64", "--width", "96",
             "--num-frames", "5", "--steps", "2", "--seed", "4"]


def python(*args, cwd=ROOT, env=None, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def checkout_env():
    """Run from elsewhere with this checkout first on the path (its k5 adds its own folders to k5.__path__)."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_public_api_loads_lazily_from_this_checkout():
    names = ["Kandinsky5Pipeline", "Request", "write_mp4", "Kandinsky5DiT", "DiTConfig", "VARIANTS", "get_variant",
             "resolve_model", "MagCache", "setup_parallel", "build_parallel", "ParallelDims", "tiny_checkpoint"]
    code = f"""
import sys, k5
assert "torch" not in sys.modules, "import k5 alone must not import torch"
from k5 import {", ".join(names)}
import k5.engine.pipelines.video as p
print(k5.__file__, p.__file__, len(VARIANTS), get_variant("t2v-lite-sft-5s").steps, Kandinsky5Pipeline is p.Kandinsky5Pipeline)
try:
    k5.no_such_name
except AttributeError as e:
    print("AttributeError", e)
print(sorted(set({names!r}) - set(dir(k5))))
"""
    r = python("-c", code)
    assert r.returncode == 0, r.stderr
    first, attr_error, missing = r.stdout.strip().splitlines()
    k5_file, pipeline_file, n, steps, same = first.split()
    assert Path(k5_file) == ROOT / "k5" / "__init__.py" and Path(pipeline_file) == ROOT / "engine" / "pipelines" / "video.py"
    assert (int(n), int(steps), same) == (len(V.VARIANTS), 50, "True")
    assert "no_such_name" in attr_error and missing == "[]"


def test_python_m_k5_generate_equals_launch_generate(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    r1 = python(ROOT / "launch" / "generate.py", *TINY_ARGS, "--save-latents", a)
    r2 = python("-m", "k5", "generate", *TINY_ARGS, "--save-latents", b)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert torch.equal(load_file(a)["latents"], load_file(b)["latents"])  # one program, same files and threads
    # The launcher's refusals and exit code, under its subcommand's name.
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", *TINY_ARGS, "--num-frames", "6", "--save-latents", str(tmp_path / "c.safetensors")])
    assert e.value.code == 2 and "num_frames 6 is not of the form 4k+1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", "tiny"])
    assert capsys.readouterr().err.startswith("usage: k5 generate [-h] --model")
    assert not (tmp_path / "c.safetensors").exists()


def test_k5_usage_and_unknown_command():
    r = python("-m", "k5")
    assert r.returncode == 2 and "usage: k5 COMMAND" in r.stdout
    assert "  generate  generate videos (MP4) and images (PNG): " in r.stdout, r.stdout
    r = python("-m", "k5", "genrate", "--model", "tiny")
    assert r.returncode == 2 and "unknown command 'genrate'; did you mean `k5 generate`?" in r.stderr
    r = python("-m", "k5", "--version")
    assert r.returncode == 0 and r.stdout.strip() == "k5 0.1.0"


def test_variants_command_lists_the_catalogue():
    r = python("-m", "k5", "variants", "--json", "--world-size", "4")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["variant"] for row in rows] == list(V.VARIANTS)
    lite = rows[0]
    # On 4 GPUs the guided Lite preset takes cfg 2 x Ulysses 2 (28 heads do not divide by 4 after the cfg halves).
    assert (lite["variant"], lite["steps"], lite["guidance"], lite["magcache"]) == ("t2v-lite-sft-5s", 50, 5.0, True)
    assert lite["layout"] == "--cfg-parallel --ulysses-degree 2 --ring-degree 1"
    text = python("-m", "k5", "variants")
    assert text.returncode == 0
    assert re.search(r"^t2v-lite-distilled16steps-5s\s+t2v\s+16\s+1\s+dense\s+512x768x121\s+-\s", text.stdout, re.M)
    assert "t2v-pro-sft-10s-hd: kandinskylab/Kandinsky-5.0-T2V-Pro-sft-10s\n" in text.stdout


def test_readme_table_is_the_catalogue():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- variants table: k5 variants --markdown -->\n")[1].split("\n<!-- end of")[0]
    assert table == catalogue.markdown(8)
    assert len(table.splitlines()) == len(V.VARIANTS) + 2
    # A row written out by hand from the reference config k5_pro_t2v_10s_sft_hd.yaml.
    assert ("| `t2v-pro-sft-10s-hd` (`T2V-Pro-sft-10s`) | 50 | 5 | NABLA P=0.7 (wT,wH,wW=11,3,3) | 768x1280x241 | yes |"
            in table)
    assert "hf download kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers" in readme


def test_readme_python_example_runs(tmp_path):
    """The README's example as a user would run it, with the tiny model given the Lite sft 5 s preset on a CPU:
    the only changes are the model (a repo id that is not in this machine's cache), the device and the output."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- api example:")[1].split("```python\n")[1].split("```")[0]
    repo = '"kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"'
    for old in (repo, 'device="cuda"', '"fox.mp4"'):
        assert block.count(old) == 1, old
    code = (block.replace(repo, '"tiny", variant="t2v-lite-sft-5s"').replace('device="cuda"', 'device="cpu"')
            .replace('"fox.mp4"', repr(str(tmp_path / "fox.mp4"))))
    r = python("-c", code, cwd=tmp_path, env=checkout_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("t2v-lite-sft-5s {")
    from k5.engine.media.mp4 import probe

    info = probe(tmp_path / "fox.mp4", count_frames=True)
    assert (info["frames"], info["width"], info["height"]) == (9, 128, 128)


def test_installed_wheel_has_the_k5_command(tmp_path):
    """Build the wheel (no network: the venv's setuptools), install it into a folder, run its `k5` script there:
    `k5 variants` works from the installed package, and `k5 bench` says it needs a checkout (bench/ is not
    installed)."""
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in set(packages.values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"k5": "k5.launch.cli:main"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("k5-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"k5/__main__.py", "k5/launch/cli.py", "k5/launch/catalogue.py", "k5/engine/catalogue/variants.py"} <= names
    # every module of the folders, subfolders (engine/'s rooms) included: a room missing from pyproject's packages
    # would be left out of the wheel
    modules = {f"k5/{p.relative_to(ROOT).as_posix()}" for folder in set(packages.values()) - {"k5"}
               for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert modules and not modules - names, sorted(modules - names)
    assert not any(n.startswith("bench/") for n in names)
    assert re.search(r"\[console_scripts\]\s*k5 = k5\.launch\.cli:main", entry_points)

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = lambda *args: subprocess.run([str(site / "bin" / "k5"), *args], capture_output=True, text=True,  # noqa
                                       cwd=tmp_path, env=env, timeout=300)
    r = run("variants", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == len(V.VARIANTS)
    where = subprocess.run([sys.executable, "-c", "import k5.launch.cli as c; print(c.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert Path(where.stdout.strip()) == site / "k5" / "launch" / "cli.py"  # the installed copy ran, not ours
    r = run("bench", "--help")
    assert r.returncode == 2 and "k5 bench needs a checkout of the k5 repository" in r.stderr


def test_bench_from_the_k5_command_in_a_checkout():
    r = python("-m", "k5", "bench", "magcache", "--help")
    assert r.returncode == 0 and "usage: python -m k5.bench magcache" in r.stdout
