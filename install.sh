#!/usr/bin/env bash
# Install everything k5 needs into ./.venv on a fresh machine (idempotent: fast when already done).
# torch is pinned to 2.13.0 and installed first, then every later step is constrained by constraints.txt, so no
# step can pull another torch (an unpinned resolve pulls a CUDA build and gigabytes of nvidia wheels).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' \
    || { echo "install.sh: Python 3.11+ needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || "${PIP[@]}" torch==2.13.0
# deepspeed is a test peer only; DS_BUILD_OPS=0 keeps its install pure Python (no C++ build).
DS_BUILD_OPS=0 "${PIP[@]}" -c constraints.txt -e ".[test,bench]"
