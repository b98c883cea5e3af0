import ffmpeg
import numpy as np
import pytest
import torch

from k5.engine.video import probe, write_mp4


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
