"""Kandinsky 6 sampling end to end against diffusers' Kandinsky6TI2VAPipeline on tiny-k6 (both load the same folder),
fp32: the final video and audio latents within 1e-4 relative (measured 3e-7 where diffusers encodes the prompts
itself, one at a time, where ours encodes both in one batch: GEMM summation order; 0 where it is given our
embeddings), and the audio decode of the same final latents within 1e-5 (measured 0: the same diffusers modules
behind our glue).

Given to both sides: the same video and audio noise (diffusers takes them as ``latents`` / ``audio_latents``, in its
channels-first layout) and the schedule of the checkpoint's scheduler config. Deliberate differences, each handed
over so that anything else would show:
1. Text: the T2AV test lets diffusers encode the prompts itself (1024 padded tokens with a key mask); ours trims the
   shared padding (engine/encoders/k6_text.py says why that is exact). The other tests give diffusers our embeddings
   (already trimmed, so no mask is needed), to keep them fast.
2. I2AV's image latent is diffusers' own ``encode_image`` (VideoProcessor resize and crop, VAE posterior sample from
   the generator): our image preparation belongs to the pipeline integration that comes later. Both sides then
   append it as the masked tail frame, each by its own code.
3. The latents: ours stay fp32 between steps; diffusers keeps them in the transformer dtype, fp32 here: no
   difference in this test.
"""

import numpy as np
import pytest
import torch
from diffusers import Kandinsky6TI2VAPipeline
from PIL import Image

from k5.engine.encoders import k6_text
from k5.engine.vae.audio import AudioDecoder
from k5.engine.sampling.k6_sampler import audio_length, sample
from k5.engine.sampling.k6_schedule import EulerSchedule, PiFlowSchedule, schedule_from_config
from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.engine.encoders.text import DEFAULT_NEGATIVE_PROMPT, TextEncoder
from k5.engine.checkpoints.dit import load_k6_dit
from numerics import rel_err

TOL = 1e-4
PROMPT = "a red fox barks in the snow"
HEIGHT, WIDTH, FRAMES = 64, 64, 5


@pytest.fixture(scope="module")
def roots():
    return {kind: k6_tiny_checkpoint(kind=kind) for kind in ("sft", "distill")}


@pytest.fixture(scope="module")
def encoder(roots):
    return TextEncoder.from_pretrained(roots["sft"], torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def pipes(roots):
    return {kind: Kandinsky6TI2VAPipeline.from_pretrained(root, torch_dtype=torch.float32)
            for kind, root in roots.items()}


def noise(seed: int, frames: int = FRAMES):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, (frames - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, 16, generator=g)
    audio = torch.randn(1, audio_length(frames, 24.0), 40, generator=g)
    return video, audio


def run_diffusers(pipe, video, audio, steps, guidance_scale, output_type="latent", **kwargs):
    """The pipeline's final (video, audio) latents channels-last as ours, and its output."""
    final = {}

    def capture(pipe, i, t, tensors):
        if i == steps - 1:
            final.update(tensors)
        return {}

    out = pipe(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=steps,
               guidance_scale=guidance_scale, latents=video.permute(0, 4, 1, 2, 3).clone(),
               audio_latents=audio.permute(0, 2, 1).clone(), output_type=output_type,
               callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents", "audio_latents"],
               **kwargs)
    video_final = final["latents"]
    if kwargs.get("image") is not None:
        video_final = video_final[:, :-1]  # the tail frame, dropped by the pipeline after the loop
    return video_final, final["audio_latents"], out


def embeds_for(cond, prefix=""):
    return {f"{prefix}prompt_embeds": cond.embeds, f"{prefix}pooled_prompt_embeds": cond.pooled}


@torch.no_grad()
def test_t2av_sft_with_guidance_and_audio_decode(roots, pipes, encoder):
    root = roots["sft"]
    dit = load_k6_dit(root, dtype=torch.float32)
    (cond, uncond), truncated = k6_text.encode(encoder, [PROMPT, DEFAULT_NEGATIVE_PROMPT])
    assert truncated == [False, False] and cond.mask is None
    video, audio = noise(11)
    schedule = schedule_from_config(root, 3)
    assert isinstance(schedule, EulerSchedule)
    got_v, got_a = sample(dit, video, audio, cond, uncond, schedule, guidance_scale=5.0)

    want_v, want_a, out = run_diffusers(pipes["sft"], video, audio, 3, 5.0, output_type="pt", prompt=PROMPT)
    assert got_v.shape == want_v.shape == (1, 2, 8, 8, 16) and got_a.shape == want_a.shape == (1, 9, 40)
    assert rel_err(got_v, want_v) <= TOL and rel_err(got_a, want_a) <= TOL
    assert rel_err(video, want_v) > 0.1 and rel_err(audio, want_a) > 0.1  # the sampler moved: not vacuous

    # The audio decode of the pipeline's own final latents: our glue around the same modules.
    decoder = AudioDecoder.from_pretrained(root)
    waveform = decoder.decode(want_a)
    assert waveform.shape == out.audio.shape == (1, 9 * 1024)
    assert rel_err(waveform, out.audio) <= 1e-5
    assert waveform.abs().max() > 0


@torch.no_grad()
def test_i2av_sft_matches_diffusers(roots, pipes, encoder):
    root, pipe = roots["sft"], pipes["sft"]
    dit = load_k6_dit(root, dtype=torch.float32)
    (cond, uncond), _ = k6_text.encode(encoder, ["the fox starts to run", DEFAULT_NEGATIVE_PROMPT])
    rgb = (np.random.default_rng(5).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    first = pipe.encode_image(image, HEIGHT, WIDTH, torch.device("cpu"), torch.float32,
                              generator=torch.Generator().manual_seed(7))  # difference 2
    video, audio = noise(3)
    got_v, got_a = sample(dit, video, audio, cond, uncond, schedule_from_config(root, 2), guidance_scale=4.0,
                          first_frame=first)
    want_v, want_a, _ = run_diffusers(pipe, video, audio, 2, 4.0, image=image,
                                      generator=torch.Generator().manual_seed(7), **embeds_for(cond),
                                      **embeds_for(uncond, "negative_"))
    assert got_v.shape == want_v.shape == video.shape
    assert rel_err(got_v, want_v) <= TOL and rel_err(got_a, want_a) <= TOL
    # The image conditions the result: the same run without it ends elsewhere.
    plain_v, _ = sample(dit, video, audio, cond, uncond, schedule_from_config(root, 2), guidance_scale=4.0)
    assert rel_err(plain_v, want_v) > 1e-2


@torch.no_grad()
def test_t2av_piflow_distilled_matches_diffusers(roots, pipes, encoder):
    root = roots["distill"]
    dit = load_k6_dit(root, dtype=torch.float32)
    assert dit.config.n_grid == 10
    (cond,), _ = k6_text.encode(encoder, [PROMPT])
    video, audio = noise(5)
    schedule = schedule_from_config(root, 3)
    assert isinstance(schedule, PiFlowSchedule)
    got_v, got_a = sample(dit, video, audio, cond, None, schedule, guidance_scale=1.0)
    want_v, want_a, _ = run_diffusers(pipes["distill"], video, audio, 3, 1.0, **embeds_for(cond))
    assert rel_err(got_v, want_v) <= TOL and rel_err(got_a, want_a) <= TOL
    assert rel_err(video, want_v) > 0.1


def test_piflow_refuses_guidance(roots):
    cond = k6_text.trimmed(torch.zeros(1, 3, 32), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 24))
    with pytest.raises(ValueError, match="guidance"):
        sample(None, torch.zeros(1, 2, 8, 8, 16), None, cond, cond, PiFlowSchedule(2), guidance_scale=5.0)


def test_audio_length_is_the_reference_rule():
    # ceil(frames / fps * 44100 / 1024): 121 frames at 24 fps are 5.04 s, 218 latents; 125 frames 225
    assert audio_length(121, 24.0) == 218 and audio_length(125, 24.0) == 225 and audio_length(5, 24.0) == 9
