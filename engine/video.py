"""uint8 frames -> H.264 MP4 through the system ffmpeg (ffmpeg-python builds the command line).

The file is written under a temporary name in the destination folder and moved into place only when ffmpeg has
finished, so a crash or a full disk never leaves a truncated video under the final name, and a finished video is
never replaced unless the caller asks.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np
import torch


def _check_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[0] == 1:
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3] (RGB), got shape {frames.shape}; pass one video of a batch")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}; convert with engine.vae.frames_to_uint8")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError("no frames to write")
    if height % 2 or width % 2:
        raise ValueError(
            f"H.264 yuv420p needs an even width and height, got {width}x{height}; crop or pad to "
            f"{width - width % 2}x{height - height % 2} (Kandinsky sizes are multiples of 16, so this means the "
            f"frames did not come from the VAE decode)"
        )
    return np.ascontiguousarray(frames)


def shareable(path: str | Path) -> None:
    """Give a mkstemp file (always 0600) the permissions the user's umask gives new files: outputs are for sharing."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Move a complete temporary file to its final name, refusing to replace a file that appeared meanwhile."""
    path = Path(path)
    shareable(tmp)  # after writing: some writers (safetensors) replace the file and its mode
    try:
        # link() refuses an existing name atomically, unlike rename(), which would replace a file that appeared
        # while this run was writing it.
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} appeared while this run was writing it; not overwritten") from None
    except OSError:  # filesystem without hard links
        if path.exists():
            raise FileExistsError(f"{path} appeared while this run was writing it; not overwritten") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_mp4(frames, path: str | Path, fps: int = 24, overwrite: bool = False, crf: int = 18) -> Path:
    """Write uint8 frames [F, H, W, 3] to an H.264 (libx264, yuv420p) MP4 at `path`; return the path.

    `overwrite=False` raises FileExistsError when `path` already exists, checked before encoding and again,
    atomically, when the finished file is moved into place.
    """
    frames = _check_frames(frames)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    num_frames, height, width, _ = frames.shape

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial.mp4")
    os.close(fd)
    try:
        stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        stream = ffmpeg.output(
            stream, tmp, format="mp4", vcodec="libx264", pix_fmt="yuv420p", r=fps, crf=crf,
            movflags="+faststart",
        )
        try:
            ffmpeg.run(stream, input=frames.tobytes(), overwrite_output=True, capture_stdout=True, capture_stderr=True)
        except ffmpeg.Error as e:
            raise RuntimeError(f"ffmpeg failed writing {path}:\n{e.stderr.decode(errors='replace')[-2000:]}") from e
        if overwrite:
            shareable(tmp)
            os.replace(tmp, path)
        else:
            publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def probe(path: str | Path, count_frames: bool = False) -> dict:
    """Frame count, size, frame rate, codec and pixel format of the first video stream of `path`.

    The frame count comes from the container unless `count_frames`, which decodes the stream to count them.
    """
    info = ffmpeg.probe(str(path), **({"count_frames": None} if count_frames else {}))
    video = next((s for s in info["streams"] if s.get("codec_type") == "video"), None)
    if video is None:
        raise ValueError(f"{path} has no video stream")
    frames = video.get("nb_read_frames") if count_frames else video.get("nb_frames")
    return dict(
        frames=int(frames), width=int(video["width"]), height=int(video["height"]),
        fps=float(Fraction(video["r_frame_rate"])), codec=video["codec_name"], pix_fmt=video["pix_fmt"],
    )
