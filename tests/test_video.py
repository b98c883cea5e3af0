import errno
import os
import subprocess
import sys
from pathlib import Path

import ffmpeg
import numpy as np
import pytest
import torch

from k5.engine.media.mp4 import UnplayableVideo, probe, write_mp4
from sandbox import can_mount, in_mount_namespace, limit_file_size

ROOT = Path(__file__).resolve().parents[1]


def gradient_frames(num_frames: int, height: int, width: int) -> torch.Tensor:
    """Smooth frames (cheap to encode, little loss) whose red, green and blue differ, to catch channel order."""
    t = torch.arange(num_frames).view(-1, 1, 1)
    y = torch.arange(height).view(1, -1, 1)
    x = torch.arange(width).view(1, 1, -1)
    r = (200 * x / width + 0 * y + 2 * t).expand(num_frames, height, width)
    g = (40 + 0 * x + 100 * y / height + 0 * t).expand(num_frames, height, width)
    b = torch.full((num_frames, height, width), 30.0)
    return torch.stack([r, g, b], dim=-1).round().to(torch.uint8)


def read_back(path, height, width) -> np.ndarray:
    out, _ = ffmpeg.input(str(path)).output("pipe:", format="rawvideo", pix_fmt="rgb24").run(
        capture_stdout=True, capture_stderr=True
    )
    return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)


def test_write_mp4_probe(tmp_path):
    frames = gradient_frames(9, 48, 64)
    path = write_mp4(frames, tmp_path / "clip.mp4")
    info = probe(path, count_frames=True)
    assert info == dict(frames=9, width=64, height=48, fps=24.0, codec="h264", pix_fmt="yuv420p")
    assert probe(path)["frames"] == 9  # the container's count agrees with the decoded count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary file left
    # H.264 is lossy; smooth content at crf 18 comes back within a few levels, in RGB order.
    back = read_back(path, 48, 64).astype(np.int16)
    assert back.shape == (9, 48, 64, 3)
    assert np.abs(back - frames.numpy().astype(np.int16)).mean() < 3.0


def test_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(gradient_frames(5, 32, 32), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_mp4(gradient_frames(9, 32, 32), path)
    assert path.read_bytes() == before
    write_mp4(gradient_frames(9, 32, 32), path, overwrite=True)
    assert probe(path, count_frames=True)["frames"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_odd_size_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="even width and height, got 63x32"):
        write_mp4(torch.zeros(3, 32, 63, 3, dtype=torch.uint8), tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(torch.zeros(3, 32, 32, 3), tmp_path / "float.mp4")
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_failure_leaves_no_partial_file(tmp_path):
    with pytest.raises(RuntimeError, match="ffmpeg failed"):
        write_mp4(gradient_frames(3, 16, 16), tmp_path / "bad.mp4", crf=-5)  # libx264 rejects crf < 0
    assert list(tmp_path.iterdir()) == []


# ---- a write that the filesystem refused is an error, whatever ffmpeg's exit status ---------------------------------

def fake_ffmpeg(tmp_path, real: Path, message: str):
    """An ffmpeg stand-in that does what ffmpeg 5.1 does when the disk fills while it writes the trailer: reads all
    its input, leaves the first half of a real video at the output path, logs ``message`` and exits 0."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "ffmpeg"
    script.write_text(f"""#!/bin/bash
for arg; do [[ $arg == *.partial* ]] && out=$arg; done  # the temporary output
cat > /dev/null
head -c $(( $(stat -c %s {real}) / 2 )) {real} > "$out"
cp "$out" {real.parent / "written"}
[[ -n "{message}" ]] && echo "{message}" >&2
exit 0
""")
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("message, error", [
    ("Error writing trailer of x.mp4: No space left on device", "No space left on device while writing"),
    ("", "is not a playable video of 9 frames 64x48"),  # nothing in the log: decoding the file shows it
])
def test_a_write_cut_short_is_an_error_even_when_ffmpeg_exits_0(tmp_path, monkeypatch, message, error):
    frames = gradient_frames(9, 48, 64)
    real = write_mp4(frames, tmp_path / "real.mp4")
    monkeypatch.setenv("PATH", f"{fake_ffmpeg(tmp_path, real, message)}:{os.environ['PATH']}")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises((OSError, UnplayableVideo), match=error) as e:
        write_mp4(frames, out / "clip.mp4")
    if message:
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert list(out.iterdir()) == []  # nothing published, no temporary file
    assert (tmp_path / "written").stat().st_size == real.stat().st_size // 2  # the stand-in did write half a video


def test_a_disk_that_fills_during_the_trailer_is_an_error(tmp_path):
    # The real thing: a filesystem with a little less room than the video (a tmpfs in a mount namespace where the
    # sandbox allows one, else a file size limit on the encoding process). ffmpeg 5.1 exits 0 when this happens
    # while it writes the trailer and leaves a file without an index; encode_mp4 must raise the write's errno.
    frames = torch.randint(0, 256, (9, 64, 64, 3), dtype=torch.uint8)  # noise: no compression to speak of
    size = write_mp4(frames, tmp_path / "full.mp4").stat().st_size
    torch.save(frames, tmp_path / "frames.pt")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); from k5.engine.media.mp4 import encode_mp4\n"
            f"try:\n    encode_mp4(torch.load({str(tmp_path / 'frames.pt')!r}), {str(mnt / 'x.mp4')!r})\n"
            f"except Exception as e:\n    print('errno', getattr(e, 'errno', None), e)\nelse:\n    print('no error')\n")
    limit = (size - 8192) // 4096 * 4096
    if can_mount():
        r = in_mount_namespace(f'mount -t tmpfs -o size={limit} tmpfs {mnt} && exec {sys.executable} -c "$CODE"',
                               env={**os.environ, "CODE": code})
        expected = f"errno {errno.ENOSPC} "
    else:  # ffmpeg dies of SIGXFSZ at the limit (subprocess restores its default action): an error all the same
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           preexec_fn=limit_file_size(limit))
        expected = "errno None ffmpeg failed writing"
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(expected), r.stdout + r.stderr
