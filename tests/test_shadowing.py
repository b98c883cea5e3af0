"""The checkout never shadows an installed package, whatever is on sys.path and wherever a command starts.

Regular packages named kernels, engine, parallel, launch, bench and serve are put on PYTHONPATH, each with a MARKER (the
`kernels` one is the real Hugging Face package that transformers 5.25 imports, with a marker added). The README's
commands then run from the checkout root (where Python puts the root first on sys.path) and from another folder;
a sitecustomize in the same folder reports, at every process's exit, what each of the six names imports as. Every
command must work and every process must see the installed packages, never the checkout's folders.

The same quick start also runs under transformers 5.24 (the release before the `kernels` dependency), with the
`kernels` package absent, in an overlay venv: the release k5 supported before must keep working."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAMES = ("kernels", "engine", "parallel", "launch", "bench", "serve")

SITECUSTOMIZE = '''
import atexit, importlib, json, os

def _report():
    out = os.environ.get("K5_MARKER_OUT")
    if not out:
        return
    seen = {}
    for name in %r:
        try:
            module = importlib.import_module(name)
            seen[name] = getattr(module, "MARKER", "no marker: " + str(getattr(module, "__path__", module)))
        except Exception as e:  # noqa: BLE001
            seen[name] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
        json.dump(seen, f)

atexit.register(_report)
''' % (NAMES,)

# The real Hugging Face `kernels`, executed as this package (its submodules resolve from its own folder), plus a
# marker: transformers gets the package it needs, and the test can tell it from the checkout's kernels/.
KERNELS = '''
import importlib.metadata as _md, os as _os
_real = str(_md.distribution("kernels").locate_file("kernels"))
__path__ = [_real]
exec(compile(open(_os.path.join(_real, "__init__.py")).read(), _os.path.join(_real, "__init__.py"), "exec"))
MARKER = "installed kernels"
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    for name in NAMES:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(KERNELS if name == "kernels" else f"MARKER = 'installed {name}'\n")
    (site / "bench" / "__main__.py").write_text("print('the installed bench ran')\n")
    return site


def run(installed, tmp_path, cwd, *argv, timeout=600):
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(installed), "K5_MARKER_OUT": str(reports), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(list(map(str, argv)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-4000:])
    seen = [json.loads(p.read_text()) for p in sorted(reports.glob("*.json"))]
    assert seen, "no process reported (sitecustomize did not run)"
    for report in seen:
        assert report == {name: f"installed {name}" for name in NAMES}, report
    return r, len(seen)


TINY = ["--model", "tiny", "--prompt", "a red fox running through snow", "--steps", "2"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_generate_script_and_module(installed, tmp_path, where):
    cwd = ROOT if where == "root" else tmp_path
    # the README's quick start: torchrun on the script, two processes
    _, processes = run(installed, tmp_path, cwd, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                       ROOT / "launch" / "generate.py", *TINY, "--output", tmp_path / "a.mp4",
                       "--save-latents", tmp_path / "a.safetensors")
    assert processes == 3  # the launcher and both workers
    # python -m k5, one process, and the k5 command's own launcher with two workers
    run(installed, tmp_path, cwd, sys.executable, "-m", "k5", "generate", *TINY, "--output", tmp_path / "b.mp4",
        "--save-latents", tmp_path / "b.safetensors")
    run(installed, tmp_path, cwd, BIN / "k5", "generate", "--nproc-per-node", "2", *TINY,
        "--output", tmp_path / "c.mp4")
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        assert (tmp_path / name).stat().st_size > 0
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_bench_and_test_collection(installed, tmp_path, where):
    cwd = ROOT if where == "root" else tmp_path
    out = tmp_path / "bench"
    r, _ = run(installed, tmp_path, cwd, sys.executable, "-m", "k5.bench", "--model", "tiny", "--height", "64",
               "--width", "64", "--frames", "1", "--peer", "diffusers", "--vae", "none", "--warmup", "0",
               "--repeat", "1", "--step-repeat", "0", "--out", out, "--name", "shadow")
    assert json.loads((out / "shadow.json").read_text())["checks"]["diffusers_rel_err"] <= 1e-3
    r, _ = run(installed, tmp_path, cwd, BIN / "k5", "bench", "--help")
    assert "usage:" in r.stdout
    r, _ = run(installed, tmp_path, cwd, sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
               "no:cacheprovider", ROOT / "tests" / "test_cli.py", ROOT / "tests" / "test_pipeline_diffusers.py")
    assert " tests collected" in r.stdout or "tests collected" in r.stdout
    # `python -m bench` names the installed package, not the checkout's bench/ (which is python -m k5.bench)
    r, _ = run(installed, tmp_path, cwd, sys.executable, "-m", "bench")
    assert r.stdout.strip() == "the installed bench ran"


def overlay_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv whose site-packages holds this venv's packages (symlinked) less transformers and kernels, plus
    transformers from the given wheel: the environment k5 ran in before transformers depended on kernels."""
    here = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    for entry in here.iterdir():
        lower = entry.name.lower()
        if lower.startswith(("transformers", "kernels")) or (site / entry.name).exists():
            continue
        (site / entry.name).symlink_to(entry)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return venv


@pytest.mark.timeout(900)
def test_transformers_before_the_kernels_dependency(tmp_path):
    wheels = sorted((BIN.parent / "compat").glob("transformers-5.24.0-*.whl"))
    assert wheels, f"{BIN.parent / 'compat'} has no transformers 5.24.0 wheel: ./install.sh downloads it"
    venv = overlay_venv(tmp_path, wheels[0])
    python = venv / "bin" / "python"
    probe = subprocess.run([python, "-c", "import importlib.util, transformers; print(transformers.__version__, "
                            "importlib.util.find_spec('kernels') is None)"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert probe.stdout.split() == ["5.24.0", "True"], probe.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outputs = {}
    for name, py in (("old", python), ("new", sys.executable)):
        r = subprocess.run([py, "-m", "torch.distributed.run", "--nproc_per_node=2", ROOT / "launch" / "generate.py",
                            *TINY, "--output", tmp_path / f"{name}.mp4", "--save-latents",
                            tmp_path / f"{name}.safetensors"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (name, r.stderr[-4000:])
        outputs[name] = load_file(tmp_path / f"{name}.safetensors")
    # The same code and weights on the same machine: only transformers differs, in the Qwen/CLIP text encoders.
    # Their outputs may differ in the last bits between releases, so the latents are compared at fp32 scale.
    for key, new in outputs["new"].items():
        old = outputs["old"][key]
        err = ((old.float() - new.float()).norm() / new.float().norm().clamp_min(1e-12)).item()
        assert err <= 1e-5, (key, err)
