#!/usr/bin/env bash
# Install everything k5 needs, reproducibly.
#
#   ./install.sh                     .venv with exactly the versions of requirements.lock (the ones CI last passed
#                                    with), every file checked against the lock's sha256; fast when already done
#   ./install.sh --relock [--upgrade]
#                                    regenerate requirements.lock (pip-compile, hashes) from pyproject.toml's
#                                    dependencies and extras and constraints.txt; --upgrade takes the newest
#                                    releases they admit, without it the current pins stay where they still fit
#   K5_DEPS=latest ./install.sh      .venv-latest with the newest releases pyproject.toml admits (torch stays at
#                                    constraints.txt's pin), then the versions that differ from the lock; .ci/latest
#                                    runs this and a smoke test: drift shows the day it happens
#
# K5_VENV overrides the venv's folder, K5_LOCK the lock (both for tests), PYTHON the interpreter (3.11).
set -euo pipefail
cd "$(dirname "$0")"

LOCK=${K5_LOCK:-requirements.lock}
COMPAT_LOCK=requirements-compat.lock
COMPAT_TRANSFORMERS=5.24.0  # the last transformers before it depended on (and imported) Hugging Face `kernels`
PYTHON=${PYTHON:-python3}
PIPQ=(-q --disable-pip-version-check)
say() { echo "install.sh: $*" >&2; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || {
    say "Python 3.11 needed (the lock is made for it): $("$PYTHON" --version 2>&1 || echo "$PYTHON not found"); set PYTHON=/path/to/python3.11"
    exit 2
}

if [ "${1:-}" = "--relock" ]; then
    # pip-compile resolves with pip's own finder, so it sees what `pip install` sees (the CPU build of torch that
    # constraints.txt pins comes from the local wheel folder of pip's configuration, hashed as it is).
    TOOLS=.venv-tools
    [ -x $TOOLS/bin/pip-compile ] || { "$PYTHON" -m venv $TOOLS && $TOOLS/bin/python -m pip install "${PIPQ[@]}" pip-tools==7.7.0; }
    UPGRADE=(); [ "${2:-}" = "--upgrade" ] && UPGRADE=(--upgrade)
    CUSTOM_COMPILE_COMMAND="./install.sh --relock" $TOOLS/bin/pip-compile --quiet "${UPGRADE[@]}" \
        --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
        --extra test --extra bench --extra serve --build-deps-for wheel -c constraints.txt -o "$LOCK" pyproject.toml
    echo "# inputs-sha256: $("$PYTHON" .ci/lock.py digest)" >> "$LOCK"
    # the transformers of the compatibility test (tests/test_install.py), one wheel, hashed
    rm -rf $TOOLS/compat && $TOOLS/bin/python -m pip download "${PIPQ[@]}" --no-deps --only-binary=:all: \
        -d $TOOLS/compat "transformers==$COMPAT_TRANSFORMERS"
    { echo "# ./install.sh --relock: the transformers release before the Hugging Face kernels dependency, for"
      echo "# tests/test_install.py (downloaded into the venv's compat/ folder, never installed into it)"
      echo "transformers==$COMPAT_TRANSFORMERS \\"
      echo "    --hash=sha256:$(sha256sum $TOOLS/compat/*.whl | cut -d' ' -f1)"; } > $COMPAT_LOCK
    say "wrote $LOCK ($(grep -c '^[a-z0-9]' "$LOCK") pins) and $COMPAT_LOCK; install them with ./install.sh"
    exit 0
fi

# System packages: ffmpeg writes and checks the videos; chromium is the headless browser that tests/test_serve_page.py
# drives the server's web page with (Debian's build, through Playwright: no browser is ever downloaded).
APT=()
command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || APT+=(ffmpeg)
command -v chromium >/dev/null || APT+=(chromium)
if [ ${#APT[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT[@]}" >/dev/null
fi

if [ "${K5_DEPS:-locked}" = latest ]; then
    VENV=${K5_VENV:-.venv-latest}
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install "${PIPQ[@]}")
    # setuptools and wheel as in the locked install (the lock holds them), at their newest, so the drift table
    # compares like with like
    "${PIP[@]}" -c constraints.txt --upgrade torch==2.13.0 setuptools wheel
    # deepspeed is a test peer only; DS_BUILD_OPS=0 keeps its install pure Python (no C++ build).
    DS_BUILD_OPS=0 "${PIP[@]}" -c constraints.txt --upgrade --upgrade-strategy eager -e ".[test,bench,serve]"
    "$VENV/bin/python" -m pip check
    "$VENV/bin/python" .ci/lock.py compare "$LOCK" "$VENV/bin/python" --drift
    exit 0
fi
[ "${K5_DEPS:-locked}" = locked ] || { say "K5_DEPS=${K5_DEPS} is not a choice: leave it unset (the lock) or set K5_DEPS=latest"; exit 2; }

"$PYTHON" .ci/lock.py check "$LOCK"
VENV=${K5_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP=$VENV/.k5-lock-sha256
WANT=$(cat "$LOCK" "$COMPAT_LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && "$VENV/bin/python" -c 'import k5' 2>/dev/null; then
    exit 0  # this venv was made from this very lock and nothing has touched the stamp since
fi
rm -f "$STAMP"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
LOG=$VENV/install.log; : > "$LOG"
fail() { "$PYTHON" .ci/lock.py explain "$LOCK" "$LOG"; exit 2; }
"$PYTHON" .ci/lock.py split "$LOCK" "$WORK"
PIP=("$VENV/bin/python" -m pip install "${PIPQ[@]}" --require-hashes --no-deps)
# torch and the build backend first: deepspeed (an sdist) and k5 itself are built against them, without build
# isolation, so that no build step fetches an unpinned setuptools.
"${PIP[@]}" -r "$WORK/first.txt" >>"$LOG" 2>&1 || fail
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation -r "$WORK/rest.txt" >>"$LOG" 2>&1 || fail
"$VENV/bin/python" -m pip install "${PIPQ[@]}" --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || fail
"$VENV/bin/python" -m pip check >>"$LOG" 2>&1 || fail
"$VENV/bin/python" -m pip download "${PIPQ[@]}" --require-hashes --no-deps -d "$VENV/compat" -r "$COMPAT_LOCK" \
    >>"$LOG" 2>&1 || { LOCK=$COMPAT_LOCK; fail; }
EXTRA=$("$VENV/bin/python" .ci/lock.py compare "$LOCK" "$VENV/bin/python" || true)
[ -z "$EXTRA" ] || say "note: $VENV differs from $LOCK (packages installed by hand?): $(echo "$EXTRA" | paste -sd ';' -); rm -rf $VENV and run ./install.sh again for exactly the lock"
echo "$WANT" > "$STAMP"
