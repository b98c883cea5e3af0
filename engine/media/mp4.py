"""uint8 frames -> H.264 MP4 through the system ffmpeg (ffmpeg-python builds the command line).

The file is written under a temporary name in the destination folder and moved into place only when it has been
checked, so a crash or a full disk never leaves a truncated video under the final name, and a finished video is
never replaced unless the caller asks. ffmpeg's exit status is not enough: ffmpeg 5.1 exits 0 when the disk fills
while it writes the trailer (its log says "No space left on device") and leaves a file without an index. So the
log is read, and the file is decoded again (``check_mp4``): its frame count and size must be the ones written.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

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
        raise ValueError(f"expected uint8 frames, got {frames.dtype}; convert with engine.vae.video.frames_to_uint8")
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


class UnplayableVideo(RuntimeError):
    """A written video that does not decode to the frames that were written (never published)."""


# What ffmpeg's log says when the filesystem refused a write, as the errno it stands for.
_WRITE_ERRORS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                 "File too large": errno.EFBIG, "Read-only file system": errno.EROFS,
                 "Input/output error": errno.EIO}


def _encoder_error(path: Path, log: str, status: int) -> Exception:
    tail = log.strip()[-2000:]
    for text, code in _WRITE_ERRORS.items():
        if text in log:
            return OSError(code, f"{os.strerror(code)} while writing {path} (ffmpeg exit status {status}: "
                                 f"{tail.splitlines()[-1] if tail else text})")
    return RuntimeError(f"ffmpeg failed writing {path} (exit status {status}):\n{tail}")


def encode_mp4(frames, path: str | Path, fps: int = 24, crf: int = 18) -> dict:
    """Encode uint8 frames [F, H, W, 3] to exactly ``path`` (replacing it) and check the result; return the
    frame count and size it holds.

    Raises OSError (errno ENOSPC, EDQUOT, EFBIG, ...) when the filesystem refused a write, even if ffmpeg exited 0,
    RuntimeError when the encoder failed, UnplayableVideo when the file does not decode to the frames written.
    """
    frames = _check_frames(frames)
    path = Path(path)
    num_frames, height, width, _ = frames.shape
    import ffmpeg  # ffmpeg-python: only where videos are written (publish and the PNG path run without it)

    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    stream = ffmpeg.output(stream, str(path), format="mp4", vcodec="libx264", pix_fmt="yuv420p", r=fps, crf=crf,
                           movflags="+faststart")
    cmd = ffmpeg.compile(stream, overwrite_output=True)
    cmd[1:1] = ["-nostdin", "-loglevel", "error"]  # only errors in the log, so any line in it is one
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    log = proc.stderr.decode(errors="replace")
    # At -loglevel error every line is an error; ffmpeg does not always let them change its exit status.
    if proc.returncode != 0 or log.strip():
        raise _encoder_error(path, log, proc.returncode)
    return check_mp4(path, num_frames, width, height)


def check_mp4(path: str | Path, frames: int, width: int, height: int) -> dict:
    """Decode the whole video stream of ``path``: raise UnplayableVideo unless it decodes without an error to
    ``frames`` frames of ``width`` x ``height``. Returns what it found."""
    cmd = ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
           "stream=nb_read_frames,width,height", "-of", "json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    problem = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    found = {}
    if proc.returncode == 0:
        try:
            stream = json.loads(proc.stdout)["streams"][0]
            found = {"frames": int(stream["nb_read_frames"]), "width": int(stream["width"]),
                     "height": int(stream["height"])}
        except (ValueError, KeyError, IndexError):
            problem = problem or "no video stream"
    want = {"frames": frames, "width": width, "height": height}
    if problem or found != want:
        got = problem or ", ".join(f"{k} {found.get(k)} (written {v})" for k, v in want.items()
                                   if found.get(k) != v)
        raise UnplayableVideo(f"{path} is not a playable video of {frames} frames {width}x{height}: {got}")
    return found


def write_published(path: str | Path, encode, suffix: str, overwrite: bool = False) -> Path:
    """Write a file through ``encode(tmp)`` (which writes and checks it) under a temporary name beside ``path``, then
    move it into place; return the path.

    ``overwrite=False`` raises FileExistsError when ``path`` already exists, checked before encoding and again,
    atomically, when the finished file is moved into place. Nothing is left behind when ``encode`` raises.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{suffix}")
    os.close(fd)
    try:
        encode(tmp)
        if overwrite:
            shareable(tmp)
            os.replace(tmp, path)
        else:
            publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_mp4(frames, path: str | Path, fps: int = 24, overwrite: bool = False, crf: int = 18) -> Path:
    """Write uint8 frames [F, H, W, 3] to an H.264 (libx264, yuv420p) MP4 at `path`; return the path.

    The video is written under a temporary name, checked (``encode_mp4``) and only then moved into place
    (``write_published``).
    """
    frames = _check_frames(frames)
    return write_published(path, lambda tmp: encode_mp4(frames, tmp, fps=fps, crf=crf), ".mp4", overwrite)


def probe(path: str | Path, count_frames: bool = False) -> dict:
    """Frame count, size, frame rate, codec and pixel format of the first video stream of `path`.

    The frame count comes from the container unless `count_frames`, which decodes the stream to count them.
    """
    import ffmpeg

    info = ffmpeg.probe(str(path), **({"count_frames": None} if count_frames else {}))
    video = next((s for s in info["streams"] if s.get("codec_type") == "video"), None)
    if video is None:
        raise ValueError(f"{path} has no video stream")
    frames = video.get("nb_read_frames") if count_frames else video.get("nb_frames")
    return dict(
        frames=int(frames), width=int(video["width"]), height=int(video["height"]),
        fps=float(Fraction(video["r_frame_rate"])), codec=video["codec_name"], pix_fmt=video["pix_fmt"],
    )
