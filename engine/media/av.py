"""uint8 frames + a mono waveform -> MP4 with an H.264 video stream and an AAC audio stream.

The sibling of engine/media/mp4.py for Kandinsky 6, on the same check-then-publish path (``write_published``): the file
is encoded under a temporary name beside the destination, decoded again, and only then moved into place. The check
adds the audio stream: exactly one, AAC, of the waveform's sample rate, whose decoded duration is the waveform's to
within one AAC frame (the encoder works in frames of 1024 samples). A video without audio (``--no-audio``) is
engine.media.mp4.write_mp4.

The waveform reaches ffmpeg as raw fp32 samples in a temporary file beside the output (the video frames take the
one stdin pipe), so no 16-bit rounding happens before the AAC encoder.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from k5.engine.media.mp4 import UnplayableVideo, _check_frames, _encoder_error, check_mp4, write_published

AAC_FRAME = 1024  # samples per AAC frame


def _check_waveform(waveform) -> np.ndarray:
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().float().cpu().numpy()
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.ndim != 1 or waveform.size == 0:
        raise ValueError(f"expected one mono waveform [S] (or [1, S]), got shape {waveform.shape}; pass one item of "
                         f"a batch")
    if not np.isfinite(waveform).all():
        raise ValueError("the waveform holds NaN or infinite samples")
    return np.ascontiguousarray(np.clip(waveform, -1.0, 1.0))


def encode_av_mp4(frames, waveform, path: str | Path, fps: int = 24, sample_rate: int = 44_100, crf: int = 18,
                  audio_bitrate: str = "192k") -> dict:
    """Encode frames [F, H, W, 3] uint8 and a waveform [S] to exactly ``path`` (replacing it) and check the result.

    Raises as engine.media.mp4.encode_mp4, and UnplayableVideo when the audio stream is not the one written."""
    frames, waveform = _check_frames(frames), _check_waveform(waveform)
    path = Path(path)
    num_frames, height, width, _ = frames.shape
    import ffmpeg  # ffmpeg-python: only where videos are written

    fd, raw = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".f32le")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(waveform.astype("<f4").tobytes())
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        audio = ffmpeg.input(raw, format="f32le", ar=sample_rate, ac=1)
        stream = ffmpeg.output(video, audio, str(path), format="mp4", vcodec="libx264", pix_fmt="yuv420p", r=fps,
                               crf=crf, acodec="aac", audio_bitrate=audio_bitrate, ar=sample_rate,
                               movflags="+faststart")
        cmd = ffmpeg.compile(stream, overwrite_output=True)
        cmd[1:1] = ["-nostdin", "-loglevel", "error"]
        proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    finally:
        os.unlink(raw)
    log = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 or log.strip():
        raise _encoder_error(path, log, proc.returncode)
    found = check_mp4(path, num_frames, width, height)
    found["audio"] = check_audio(path, waveform.size, sample_rate)
    return found


def check_audio(path: str | Path, samples: int, sample_rate: int) -> dict:
    """Decode the audio of ``path``: raise UnplayableVideo unless it has exactly one stream, AAC, mono at
    ``sample_rate``, lasting ``samples`` samples to within one AAC frame. Returns what it found."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "a", "-count_frames", "-show_entries",
           "stream=codec_name,sample_rate,channels,duration,nb_read_frames", "-of", "json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    problem = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    streams = []
    if proc.returncode == 0:
        try:
            streams = json.loads(proc.stdout)["streams"]
        except (ValueError, KeyError):
            problem = problem or "ffprobe output unreadable"
    want = samples / sample_rate
    if not problem and len(streams) != 1:
        problem = f"{len(streams)} audio streams"
    found = {}
    if not problem:
        s = streams[0]
        try:
            found = {"codec": s["codec_name"], "sample_rate": int(s["sample_rate"]), "channels": int(s["channels"]),
                     "duration": float(s["duration"]), "frames": int(s["nb_read_frames"])}
        except (KeyError, ValueError):
            problem = f"incomplete audio stream {s}"
    if not problem:
        if (found["codec"], found["sample_rate"], found["channels"]) != ("aac", sample_rate, 1):
            problem = (f"{found['codec']} {found['sample_rate']} Hz x{found['channels']} "
                       f"(written aac {sample_rate} Hz x1)")
        elif abs(found["duration"] - want) > AAC_FRAME / sample_rate or found["frames"] < samples // AAC_FRAME:
            problem = f"{found['duration']:.4f} s in {found['frames']} AAC frames (written {want:.4f} s)"
    if problem:
        raise UnplayableVideo(f"{path} has no playable AAC track of {want:.3f} s: {problem}")
    return found


def write_av_mp4(frames, waveform, path: str | Path, fps: int = 24, sample_rate: int = 44_100,
                 overwrite: bool = False, crf: int = 18) -> Path:
    """Write an MP4 with the video and its audio track at ``path`` through the check-then-publish path of
    engine.media.mp4.write_published; return the path. The waveform should already last as long as the video
    (engine.vae.audio.fit_to_video)."""
    frames, waveform = _check_frames(frames), _check_waveform(waveform)
    return write_published(path, lambda tmp: encode_av_mp4(frames, waveform, tmp, fps=fps, sample_rate=sample_rate,
                                                           crf=crf), ".mp4", overwrite)
