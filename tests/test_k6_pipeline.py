"""Kandinsky6Pipeline (engine/pipelines/k6.py) against diffusers' Kandinsky6TI2VAPipeline on tiny-k6, fp32: the final
video and audio latents of a whole request within 1e-4 relative (both load the same folder).

Here the pipeline draws its own noise and encodes its own text and image, so what is compared is the request path
as a whole: diffusers is given only ``generator=torch.Generator().manual_seed(seed)``, from which it draws the video
noise, then the audio noise (T2AV: the same draws as ours). Deliberate differences, each handed over:
1. I2AV: diffusers draws the image's posterior sample from that generator *before* the noise; ours draws it from a
   generator of its own (seeded the same, so the image latent is the same), because a parallel run encodes the
   image on one rank only. Diffusers is given our noise as ``latents`` / ``audio_latents`` (its layout).
2. Text: ours trims the shared padding of the 1024-token budget (engine/encoders/k6_text.py: exact), diffusers keeps
   it with a key mask: GEMM summation order only.
"""

import numpy as np
import pytest
import torch
from diffusers import Kandinsky6TI2VAPipeline
from PIL import Image

from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.engine.encoders.text import DEFAULT_NEGATIVE_PROMPT
from k5.engine.pipelines.k6 import Kandinsky6Pipeline, av_noise, check_request, check_schedule
from k5.engine.pipelines.video import Request
from k5.engine.vae.audio import AudioDecoder, fit_to_video
from numerics import rel_err

TOL = 1e-4
PROMPT = "a red fox barks in the snow"


@pytest.fixture(scope="module")
def roots():
    return {kind: k6_tiny_checkpoint(kind=kind) for kind in ("sft", "distill")}


@pytest.fixture(scope="module")
def ours(roots):
    return {kind: Kandinsky6Pipeline.from_pretrained(root, torch.float32) for kind, root in roots.items()}


@pytest.fixture(scope="module")
def theirs(roots):
    return {kind: Kandinsky6TI2VAPipeline.from_pretrained(root, torch_dtype=torch.float32)
            for kind, root in roots.items()}


def reference(pipe, req, **kwargs):
    with torch.no_grad():
        video, audio = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, height=req.height,
                            width=req.width, num_frames=req.num_frames, num_inference_steps=req.steps,
                            guidance_scale=req.guidance_scale, output_type="latent", return_dict=False, **kwargs)
    return video.permute(0, 2, 3, 4, 1), (audio.permute(0, 2, 1) if audio is not None else None)


def test_t2av_sft_with_guidance(ours, theirs):
    req = Request(PROMPT, DEFAULT_NEGATIVE_PROMPT, height=64, width=64, num_frames=5, steps=2, guidance_scale=5.0,
                  seed=3)
    got = ours["sft"].generate(req)
    video, audio = reference(theirs["sft"], req, generator=torch.Generator().manual_seed(3))
    assert got.latents.shape == video.shape and got.audio.shape == audio.shape
    assert rel_err(got.latents, video) < TOL
    assert rel_err(got.audio, audio) < TOL
    # the audio decode of our final latents is the decoder's, cut to the video's 5 frames at 24 fps
    wave = ours["sft"].decode_audio(got.audio, req.num_frames)
    direct = AudioDecoder.from_pretrained(ours["sft"].root).decode(got.audio)[0]
    assert torch.equal(wave, fit_to_video(direct, 5, 24, 44_100)) and wave.shape[-1] == round(5 / 24 * 44_100)


def test_t2av_piflow_distilled(ours, theirs):
    req = Request(PROMPT, DEFAULT_NEGATIVE_PROMPT, height=64, width=96, num_frames=9, steps=2, guidance_scale=1.0,
                  seed=5)
    got = ours["distill"].generate(req)
    video, audio = reference(theirs["distill"], req, generator=torch.Generator().manual_seed(5))
    assert rel_err(got.latents, video) < TOL and rel_err(got.audio, audio) < TOL


def test_i2av_first_frame(ours, theirs, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "first.png"
    Image.fromarray((rng.random((50, 90, 3)) * 255).astype(np.uint8)).save(path)  # cropped to 64x64 by both
    req = Request(PROMPT, DEFAULT_NEGATIVE_PROMPT, height=64, width=64, num_frames=5, steps=2, guidance_scale=5.0,
                  seed=7, image=str(path))
    got = ours["sft"].generate(req)
    noise, audio_noise = av_noise(req.latent_shape(), got.audio.shape, 7, "cpu")
    video, audio = reference(theirs["sft"], req, image=Image.open(path).convert("RGB"),
                             generator=torch.Generator().manual_seed(7), latents=noise.permute(0, 4, 1, 2, 3),
                             audio_latents=audio_noise.permute(0, 2, 1))
    assert rel_err(got.latents, video) < TOL and rel_err(got.audio, audio) < TOL
    t2av = ours["sft"].generate(Request(**{**req.__dict__, "image": None}))
    assert rel_err(got.latents, t2av.latents) > 1e-3  # the image conditions the video


def test_no_audio_samples_the_video_alone(roots, theirs):
    pipe = Kandinsky6Pipeline.from_pretrained(roots["distill"], torch.float32, audio=False)
    assert pipe.audio is None
    req = Request(PROMPT, height=64, width=64, num_frames=5, steps=2, guidance_scale=1.0, seed=2)
    got = pipe.generate(req)
    video, audio = reference(theirs["distill"], req, generator=torch.Generator().manual_seed(2), sample_audio=False)
    assert got.audio is None and audio is None
    assert rel_err(got.latents, video) < TOL


def test_request_checks(roots, tmp_path):
    from k5.engine.checkpoints.dit import locate
    from k5.engine.checkpoints.state_dict import K6

    cfg = locate(roots["sft"], K6).config
    with pytest.raises(ValueError, match="multiple of 16"):
        check_request(Request(PROMPT, height=72, width=64), cfg, nabla=False)
    with pytest.raises(ValueError, match="multiple of 128"):
        check_request(Request(PROMPT, height=64, width=64), cfg, nabla=True)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("text")
    with pytest.raises(ValueError, match="Pillow"):
        check_request(Request(PROMPT, height=64, width=64, num_frames=5, image=str(bad)), cfg, nabla=False)
    with pytest.raises(ValueError, match="--guidance-scale 1"):
        check_schedule(roots["distill"], 5.0)
    check_schedule(roots["distill"], 1.0)
    check_schedule(roots["sft"], 5.0)
