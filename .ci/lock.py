"""The lock file's helpers for install.sh (stdlib only: it runs before any venv exists).

    python .ci/lock.py digest                     the digest of the lock's inputs (pyproject.toml's dependencies,
                                                  extras and build requirements, constraints.txt)
    python .ci/lock.py check LOCK                 exit 2 with one line when LOCK was made from other inputs
    python .ci/lock.py split LOCK DIR             DIR/first.txt (torch and the build backend, installed before
                                                  anything is built) and DIR/rest.txt
    python .ci/lock.py explain LOCK PIP_LOG       one line: which package of LOCK pip could not install, and why
    python .ci/lock.py compare LOCK [PYTHON]      what PYTHON's environment holds beyond or unlike LOCK (exit 1 if
                                                  anything differs); --drift prints a table instead and exits 0

The lock is pip-compile's output (hashes for every file of every pinned version) with one line appended:
``# inputs-sha256: <digest>``, written by ``./install.sh --relock``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELOCK = "./install.sh --relock"
DIGEST_LINE = "# inputs-sha256: "
FIRST = ("torch", "setuptools", "wheel")  # built against / installed before the sdists (deepspeed) and k5 itself
OWN = "k5"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def digest(root: Path = ROOT) -> str:
    """What the lock depends on: a change to any of these needs a new lock."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    inputs = {
        "dependencies": pyproject["project"].get("dependencies", []),
        "optional-dependencies": pyproject["project"].get("optional-dependencies", {}),
        "build-system": pyproject.get("build-system", {}).get("requires", []),
        "constraints": [line.strip() for line in (root / "constraints.txt").read_text().splitlines()
                        if line.strip() and not line.startswith("#")],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def blocks(lock: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, the requirement's lines) for every pin of a pip-compile lock."""
    out: dict[str, tuple[str, str]] = {}
    current = None
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if m:
            current = normalize(m.group(1))
            out[current] = (m.group(2), line + "\n")
        elif current and line.startswith("    --hash="):
            version, text = out[current]
            out[current] = (version, text + line + "\n")
        elif not line.startswith("    "):
            current = None
    return out


def check(lock: Path) -> int:
    text = lock.read_text() if lock.is_file() else ""
    if not text:
        print(f"install.sh: {lock.name} is missing or empty; generate it with {RELOCK}", file=sys.stderr)
        return 2
    recorded = [line[len(DIGEST_LINE):].strip() for line in text.splitlines() if line.startswith(DIGEST_LINE)]
    if recorded != [digest()]:
        print(f"install.sh: {lock.name} was made from other dependencies than pyproject.toml and constraints.txt "
              f"now name (a stale or hand-edited lock); regenerate it with {RELOCK}", file=sys.stderr)
        return 2
    return 0


def split(lock: Path, out: Path) -> int:
    pins = blocks(lock)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first.txt").write_text("".join(pins[n][1] for n in FIRST if n in pins))
    (out / "rest.txt").write_text("".join(text for n, (_, text) in pins.items() if n not in FIRST))
    return 0


def explain(lock: Path, log: Path) -> int:
    """pip's error, cut to one line that names the package: pip prints tens of lines, most of them advice."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    pins = blocks(lock)
    reason, name = None, None
    patterns = [
        (r"No matching distribution found for ([^\s]+)", "the package index has no such release"),
        (r"Could not find a version that satisfies the requirement ([^\s]+)", "the package index has no such release"),
        (r"THESE PACKAGES DO NOT MATCH THE HASHES.*?\n\s+([^\s]+) from ", "its file does not match the lock's hash"),
        (r"Hashes are required in --require-hashes mode.*?\n\s+([^\s]+) ", "the lock has no hash for it"),
        (r"all requirements must have their versions pinned with ==\. These do not:\s+([^\s]+)",
         "the lock does not pin it with =="),
        (r"(\S+) [\d.]+\S* has requirement ([^\n]+?), but you have", None),
        (r"(\S+) [\d.]+\S* requires (\S+), which is not installed", None),
        (r"Failed to build ([^\s]+)", "its source distribution did not build"),
        (r"ERROR: Invalid requirement: '([^']+)'", "the line is not a requirement"),
    ]
    for pattern, why in patterns:
        m = re.search(pattern, text, flags=re.S)
        if m:
            name = m.group(1)
            if why is None:  # pip check: the environment the lock installs is not consistent
                dependent, wanted = m.group(1), m.group(2)
                why = f"{dependent} needs {wanted.strip()}, which the lock does not provide"
                name = wanted.strip()
            reason = why
            break
    if name is None:
        last = [line.strip() for line in text.splitlines() if line.strip().startswith("ERROR")]
        name, reason = "?", (last[-1] if last else "pip failed")
    base = normalize(re.split(r"[=<>!~ ;\[]", name)[0])
    pinned = f" (pinned {base}=={pins[base][0]})" if base in pins and "==" not in name else ""
    print(f"install.sh: {lock.name} does not install: {name}{pinned}: {reason}; regenerate the lock with {RELOCK} "
          f"(pip's log: {log})", file=sys.stderr)
    return 2


def installed(python: str) -> dict[str, str]:
    r = subprocess.run([python, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                       capture_output=True, text=True, check=True)
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            out[normalize(m.group(1))] = m.group(2)
    out.pop("pip", None)  # the venv's own installer, from the Python it was made with
    out.pop(OWN, None)
    return out


def compare(lock: Path, python: str, drift: bool) -> int:
    pins = {name: version for name, (version, _) in blocks(lock).items()}
    have = installed(python)
    rows = []
    for name in sorted(set(pins) | set(have)):
        if pins.get(name) != have.get(name):
            rows.append((name, pins.get(name, "-"), have.get(name, "-")))
    if drift:
        if not rows:
            print("drift: none (every package at the lock's version)")
        else:
            print(f"drift: {len(rows)} package(s) differ from {lock.name}")
            print(f"  {'package':<28} {'lock':<16} newest")
            for name, want, got in rows:
                print(f"  {name:<28} {want:<16} {got}")
        return 0
    for name, want, got in rows:
        print(f"{name}: lock {want}, installed {got}")
    return 1 if rows else 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    if command == "digest":
        print(digest())
        return 0
    if command == "check":
        return check(Path(args[0]))
    if command == "split":
        return split(Path(args[0]), Path(args[1]))
    if command == "explain":
        return explain(Path(args[0]), Path(args[1]))
    if command == "compare":
        drift = "--drift" in args
        args = [a for a in args if a != "--drift"]
        return compare(Path(args[0]), args[1] if len(args) > 1 else sys.executable, drift)
    print(f"lock.py: unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
