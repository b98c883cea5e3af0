"""MP4 with an H.264 video stream and an AAC audio track (engine/media/av.py), checked with ffprobe run here directly:
exactly one stream of each, the frame count, and an audio duration equal to the video's to within one AAC frame
(1024 samples, 23 ms at 44.1 kHz: the encoder's granularity). Plus the publish rules of engine/media/mp4.py (no
overwrite, nothing left behind on failure) and tiny-k6 end to end: sampler -> video and audio decode -> MP4.
"""

import json
import subprocess

import numpy as np
import pytest
import torch

from k5.engine.encoders import k6_text
from k5.engine.vae.audio import AudioDecoder, fit_to_video
from k5.engine.media.av import check_audio, write_av_mp4
from k5.engine.sampling.k6_sampler import audio_length, sample
from k5.engine.sampling.k6_schedule import schedule_from_config
from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.engine.encoders.text import TextEncoder
from k5.engine.vae.video import VideoVAE
from k5.engine.media.mp4 import UnplayableVideo, write_mp4
from k5.engine.checkpoints.dit import load_k6_dit

SR = 44_100


def streams(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                          "stream=codec_type,codec_name,nb_frames,duration,sample_rate,channels", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["streams"]


def assert_av(path, frames, fps, samples):
    s = streams(path)
    video = [x for x in s if x["codec_type"] == "video"]
    audio = [x for x in s if x["codec_type"] == "audio"]
    assert len(s) == 2 and len(video) == len(audio) == 1
    assert video[0]["codec_name"] == "h264" and int(video[0]["nb_frames"]) == frames
    assert audio[0]["codec_name"] == "aac" and int(audio[0]["sample_rate"]) == SR and audio[0]["channels"] == 1
    assert abs(float(audio[0]["duration"]) - frames / fps) <= 1024 / SR
    assert samples == round(frames / fps * SR)


def frames_and_tone(frames=25, height=48, width=64, fps=24, extra=700):
    rng = np.random.default_rng(0)
    video = (rng.random((frames, height, width, 3)) * 255).astype(np.uint8)
    t = torch.arange(round(frames / fps * SR) + extra) / SR
    return video, 0.5 * torch.sin(2 * torch.pi * 440 * t)


def test_video_with_an_aac_track(tmp_path):
    video, tone = frames_and_tone()
    tone = fit_to_video(tone, 25, 24, SR)
    path = write_av_mp4(video, tone, tmp_path / "clip.mp4", fps=24, sample_rate=SR)
    assert_av(path, 25, 24, tone.shape[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary left


def test_publish_rules(tmp_path):
    video, tone = frames_and_tone()
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"finished")
    with pytest.raises(FileExistsError, match="exists"):
        write_av_mp4(video, tone, path)
    assert path.read_bytes() == b"finished"
    bad = tone.clone()
    bad[100] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        write_av_mp4(video, bad, tmp_path / "nan.mp4")
    with pytest.raises(ValueError, match="mono waveform"):
        write_av_mp4(video, torch.zeros(2, 1000), tmp_path / "stereo.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_check_audio_refuses_a_file_without_the_track(tmp_path):
    video, _ = frames_and_tone()
    path = write_mp4(video, tmp_path / "silent.mp4")  # --no-audio's writer: video only
    with pytest.raises(UnplayableVideo, match="0 audio streams"):
        check_audio(path, 1000, SR)


def test_fit_to_video():
    wave = torch.ones(10_000)
    assert fit_to_video(wave, 5, 24, SR).shape[-1] == round(5 / 24 * SR) == 9188
    short = fit_to_video(torch.ones(9000), 5, 24, SR)
    assert short.shape[-1] == 9188 and short[9000:].abs().sum() == 0
    with pytest.raises(ValueError, match="do not belong together"):
        fit_to_video(torch.ones(5000), 5, 24, SR)


@torch.no_grad()
def test_tiny_k6_end_to_end_to_mp4(tmp_path):
    """What `k5 generate --model tiny-k6` will do, at the module level: one H.264 and one AAC stream, 5 frames."""
    root = k6_tiny_checkpoint(kind="distill")
    encoder = TextEncoder.from_pretrained(root, torch_dtype=torch.float32)
    (cond,), _ = k6_text.encode(encoder, ["a red fox barks in the snow"])
    dit = load_k6_dit(root, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    frames, fps = 5, 24
    video, audio = sample(dit, torch.randn(1, 2, 8, 8, 16, generator=g),
                          torch.randn(1, audio_length(frames, fps), 40, generator=g), cond, None,
                          schedule_from_config(root, 2), guidance_scale=1.0)
    pixels = VideoVAE.from_pretrained(root, torch_dtype=torch.float32).decode(video)[0]
    waveform = fit_to_video(AudioDecoder.from_pretrained(root).decode(audio)[0], frames, fps, SR)
    path = write_av_mp4(pixels, waveform, tmp_path / "fox.mp4", fps=fps, sample_rate=SR)
    assert_av(path, frames, fps, waveform.shape[-1])
