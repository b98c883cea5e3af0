"""The engine, kernels and parallel packages import with torch, transformers and safetensors alone (diffusers and
ffmpeg-python are needed only where the VAE runs and MP4s are written), and pyproject admits the torch of the GPU
images (2.11) while CI installs exactly the pin of constraints.txt."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = ("diffusers", "ffmpeg", "einops", "tqdm", "accelerate")
PROGRAM = f"""
import importlib.abc, importlib.machinery, sys

class Absent(importlib.abc.Loader):  # found (torch probes optional packages) but not importable, as if uninstalled
    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} is blocked: this code path must not need it")

    def exec_module(self, module):
        pass

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return importlib.machinery.ModuleSpec(name, Absent())

sys.meta_path.insert(0, Block())
import torch
from pathlib import Path
modules = ["k5.engine." + p.stem for p in Path("engine").glob("*.py") if p.stem not in ("i2v", "video", "__init__")]
modules += ["k5.kernels." + p.stem for p in Path("kernels").glob("*.py") if p.stem != "__init__"]
modules += ["k5.parallel." + p.stem for p in Path("parallel").glob("*.py") if p.stem != "__init__"]
for m in modules:
    __import__(m)
from k5.engine.model.config import DiTConfig
from k5.engine.model.dit import Kandinsky5DiT
cfg = DiTConfig(in_text_dim=8, in_text_dim2=8, time_dim=16, model_dim=32, ff_dim=64, num_text_blocks=1,
                num_visual_blocks=1, axes_dims=(4, 6, 6))
out = Kandinsky5DiT(cfg)(torch.randn(1, 1, 4, 4, cfg.in_channels), torch.randn(1, 3, 8), torch.randn(1, 8),
                         torch.tensor([500.0]))
assert out.shape == (1, 1, 4, 4, 16) and bool(torch.isfinite(out).all())
print(len(modules), "modules")
"""


def test_engine_kernels_parallel_import_without_diffusers_or_ffmpeg():
    r = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[0]) >= 20


def test_torch_is_a_range_admitting_2_11_and_ci_pins_it():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [d for d in deps if re.match(r"torch\b", d)]
    spec = torch_req[len("torch"):].replace(" ", "")
    assert "==" not in spec, torch_req  # an exact pin would make pip replace a user's own CUDA build
    bounds = dict(re.findall(r"(>=|<)([\d.]+)", spec))
    version = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    for admitted in ("2.11.0", "2.13.0"):
        assert version(bounds[">="]) <= version(admitted) < version(bounds["<"]), (torch_req, admitted)
    assert (ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]
