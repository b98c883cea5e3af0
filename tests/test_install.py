"""Reproducible installs: the venv the tests run in is exactly requirements.lock, a stale or broken lock is refused
by install.sh with one line naming the package and the command that regenerates the lock, and the lock's inputs
digest follows pyproject.toml and constraints.txt.

Written against pip's behaviour, not k5's: the broken-lock cases run install.sh itself, offline (PIP_NO_INDEX with
an empty or tiny local wheel folder), in a throwaway venv that sees this venv's packages through a .pth file, so
that what is already installed is "already satisfied" and only the broken line is looked up."""

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"

def _load_lock_helpers():
    """.ci/lock.py (stdlib only), loaded by path under a name of its own: .ci/ never goes on sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("k5_ci_lock", ROOT / ".ci" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _load_lock_helpers()


def test_the_venv_is_exactly_the_lock():
    """pip freeze of this environment (less pip itself and k5's own editable line) equals the lock's pins."""
    pins = {name: version for name, (version, _) in lock.blocks(LOCK).items()}
    have = lock.installed(sys.executable)
    assert have == pins, ("this venv differs from requirements.lock (rm -rf .venv && ./install.sh):\n"
                          + "\n".join(f"{n}: lock {pins.get(n)}, venv {have.get(n)}"
                                      for n in sorted(set(pins) | set(have)) if pins.get(n) != have.get(n)))


def test_the_lock_pins_everything_with_hashes_and_matches_its_inputs():
    text = LOCK.read_text()
    pins = lock.blocks(LOCK)
    assert {"torch", "transformers", "diffusers", "kernels", "setuptools"} <= set(pins)
    assert pins["torch"][0] == "2.13.0+cpu"  # constraints.txt's pin, the CPU build
    for name, (_, block) in pins.items():
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), f"{name} has no hash"
    assert text.splitlines()[-1] == f"# inputs-sha256: {lock.digest()}"
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "lock.py"), "check", str(LOCK)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_the_digest_changes_with_a_dependency(tmp_path):
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    before = lock.digest(tmp_path)
    assert before == lock.digest(ROOT)
    py = tmp_path / "pyproject.toml"
    py.write_text(py.read_text().replace('"tqdm>=4.60",', '"tqdm>=4.60",\n    "rich>=13",'))
    assert lock.digest(tmp_path) != before


def run_install(tmp_path, lock_text: str, wheels: Path | None = None):
    """install.sh in a throwaway venv that already holds this venv's packages (through a .pth file), offline."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    here = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "k5-test-parent.pth").write_text(f"{here}\n")
    broken = tmp_path / "requirements.lock"
    broken.write_text(lock_text)
    if wheels is None:
        wheels = tmp_path / "no-wheels"
        wheels.mkdir()
    env = {**os.environ, "K5_VENV": str(venv), "K5_LOCK": str(broken), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(wheels), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "install.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    return r, venv


def with_digest(body: str) -> str:
    return body + f"# inputs-sha256: {lock.digest()}\n"


def torch_block() -> str:
    return lock.blocks(LOCK)["torch"][1]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_stale_lock_is_refused_before_anything_is_made(tmp_path):
    text = LOCK.read_text().replace(f"# inputs-sha256: {lock.digest()}", "# inputs-sha256: " + "0" * 64)
    r, venv = run_install(tmp_path, text)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "stale or hand-edited" in line and "./install.sh --relock" in line
    assert not (venv / "install.log").exists()  # refused before any pip step


@pytest.mark.timeout(900)
def test_a_release_the_index_does_not_have_gets_one_line(tmp_path):
    fake = "transformers==99.0.0 \\\n    --hash=sha256:" + "1" * 64 + "\n"
    r, venv = run_install(tmp_path, with_digest(torch_block() + fake))
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert "transformers==99.0.0" in line and "no such release" in line and "./install.sh --relock" in line


@pytest.mark.timeout(900)
def test_a_file_that_does_not_match_its_hash_gets_one_line(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    whl = wheels / "k5_hashcheck-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("k5_hashcheck/__init__.py", "")
        z.writestr("k5_hashcheck-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: k5-hashcheck\nVersion: 1.0\n")
        z.writestr("k5_hashcheck-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("k5_hashcheck-1.0.dist-info/RECORD", "")
    wrong = hashlib.sha256(whl.read_bytes() + b"edited").hexdigest()
    r, venv = run_install(tmp_path, with_digest(torch_block() + f"k5-hashcheck==1.0 \\\n    --hash=sha256:{wrong}\n"),
                          wheels)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert "k5-hashcheck==1.0" in line and "does not match the lock's hash" in line and "--relock" in line
    assert "THESE PACKAGES DO NOT MATCH" in (venv / "install.log").read_text()  # pip's own words, kept in the log


def test_explain_names_the_package_of_each_pip_failure(tmp_path):
    """pip's messages (as pip 23-26 print them) cut to the one line install.sh prints."""
    cases = {
        "ERROR: Could not find a version that satisfies the requirement einops==9.9 (from versions: 0.8.2)\n"
        "ERROR: No matching distribution found for einops==9.9\n": ("einops==9.9", "no such release"),
        "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE. ...\n"
        "    tqdm==4.70.1 from https://files/tqdm.whl:\n        Expected sha256 00\n             Got        11\n":
            ("tqdm==4.70.1", "does not match"),
        "transformers 5.24.0 has requirement huggingface-hub<2.0,>=1.0, but you have huggingface-hub 2.5.0.\n":
            ("huggingface-hub<2.0", "transformers needs"),
        "k5 0.1.0 requires fastapi, which is not installed.\n": ("fastapi", "k5 needs fastapi"),
    }
    for i, (log, (name, why)) in enumerate(cases.items()):
        path = tmp_path / f"{i}.log"
        path.write_text(log)
        r = subprocess.run([sys.executable, str(ROOT / ".ci" / "lock.py"), "explain", str(LOCK), str(path)],
                           capture_output=True, text=True)
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert name in line and why in line and "./install.sh --relock" in line, line


def test_split_puts_torch_and_the_build_backend_first(tmp_path):
    lock.split(LOCK, tmp_path)
    first = lock.blocks(tmp_path / "first.txt")
    rest = lock.blocks(tmp_path / "rest.txt")
    assert set(first) == {"torch", "setuptools", "wheel"}
    assert set(first) | set(rest) == set(lock.blocks(LOCK)) and not set(first) & set(rest)
    assert json.dumps(sorted(rest)) == json.dumps(sorted(n for n in lock.blocks(LOCK) if n not in first))
