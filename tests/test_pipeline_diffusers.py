"""Kandinsky5Pipeline end to end against diffusers' Kandinsky5T2VPipeline and Kandinsky5I2VPipeline on the tiny
checkpoint (the same folder, both loaded from it), fp32: final latents, relative error <= 1e-4 (measured 5e-7 and
6e-7: what is left is summation order).

Our pipeline follows the original Kandinsky code where diffusers departs from it. Each deliberate difference is
handed from one side to the other (to diffusers except 6), so that both compute the same thing and any other
difference shows:
1. Schedule: the original's t_i = linspace(1, 0, N+1) shifted by s*t / (1 + (s-1)*t); diffusers' scheduler shifts
   linspace(1, 1/N, N). Diffusers gets a shift-1 scheduler whose set_timesteps takes our sigmas.
2. Timestep: the DiT sees t*1000 in fp32; diffusers rounds it to the transformer dtype. The same in fp32: nothing
   to hand over here (it matters in bf16).
3. Text: the original template ("promt", crop 129), 256 prompt tokens with a key mask, no prompt cleaning; diffusers
   fixes the typo, crops 128, pads to the longest prompt without a mask and cleans with ftfy. Diffusers gets our
   Qwen embeddings with the padding removed (what our key mask computes), our CLIP vector and cu_seqlens [0, L].
4. RoPE scale: the original's configs set (1, 2, 2) at resolution 512; diffusers picks (1, 3.16, 3.16) for any side
   outside 480..854, which the tiny sizes are. Diffusers' _get_scale_factor returns the original's.
5. Noise: ours is drawn on the CPU from the seed; diffusers gets it as `latents` (with the zero visual_cond
   channels and mask, which diffusers adds only to noise it draws itself).
6. RoPE output: diffusers' apply_rotary rounds q and k to bf16 whatever the dtype (the original does the same under
   its bf16 autocast); our fp32 path keeps them fp32. Here our apply_rope rounds them the same way (without it the
   two DiTs differ by 2.5e-4 to 4.5e-4 per forward on these shapes, 1.6e-4 on the final latents).
Image to video, in addition:
7. Frame size: ours fits the image by area as the original (test_i2v.py); diffusers resizes to the height and width
   it is given, so it is given the fitted size.
8. Image latent: ours resizes as the original (bilinear, antialiased, uint8) and draws the posterior sample from the
   seed; diffusers resizes PIL input with Lanczos and samples with its noise generator. Diffusers gets the image
   latent in frame 0 of `latents` (mask 1 there, as its prepare_latents builds it), computed here with diffusers'
   own VAE from the image prepared by the original's rule written out in test_i2v.py.
9. First-frame renormalisation: the original's statistics per frame, diffusers' over the 4 frames together.
   Diffusers' normalize_first_frame is replaced by the original's rule, written out below.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
from PIL import Image

import k5.engine.model.dit
from k5.engine.pipelines.video import Kandinsky5Pipeline, Request, frame_size, hd_bucket
from k5.engine.sampling.sampler import initial_noise, timesteps
from k5.engine.catalogue.tiny import tiny_checkpoint
from numerics import rel_err
from test_i2v import original_first_frame_image

TOL = 1e-4


@pytest.fixture(scope="module")
def root():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def ours(root):
    return Kandinsky5Pipeline.from_pretrained(root, dtype=torch.float32)


@pytest.fixture(scope="module")
def t2v(root):
    return Kandinsky5T2VPipeline.from_pretrained(root, torch_dtype=torch.float32)


@pytest.fixture(autouse=True)
def rope_rounded_like_diffusers(monkeypatch):
    """Difference 6: q and k rounded to bf16 after the rotation, as diffusers' apply_rotary does."""
    apply_rope = k5.engine.model.dit.apply_rope
    monkeypatch.setattr(k5.engine.model.dit, "apply_rope",
                        lambda x, cos, sin: apply_rope(x, cos, sin).to(torch.bfloat16).to(x.dtype))


def feed_schedule(pipe, ours, req):
    """Difference 1: a shift-1 scheduler that takes our sigmas (the terminal 0 it appends itself)."""
    sigmas = timesteps(req.steps, req.shift or ours.default_shift)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=sigmas[:-1].tolist(), device=device)
    pipe.scheduler = scheduler
    return sigmas


def feed_text(ours, req) -> dict:
    """Difference 3: our embeddings, padding removed (our key mask keeps the same tokens)."""
    (cond, uncond), _ = ours.encode([req.prompt, req.negative_prompt])
    out = {}
    for prefix, c in (("", cond), ("negative_", uncond)):
        tokens = c.embeds[c.mask]  # [L, D]
        out[f"{prefix}prompt_embeds_qwen"] = tokens[None]
        out[f"{prefix}prompt_embeds_clip"] = c.pooled
        out[f"{prefix}prompt_cu_seqlens"] = torch.tensor([0, tokens.shape[0]], dtype=torch.int32)
    return out


def original_scale_factor(req):
    """Difference 4: the original configs' scale_factor for their resolution (512: (1, 2, 2); 1024: (1, 3.16, 3.16))."""
    return lambda height, width: (1.0, 3.16, 3.16) if hd_bucket(req.height, req.width) else (1.0, 2.0, 2.0)


def with_visual_cond(latents, first_frame=None):
    """Difference 5 (and 8): [latent, zero conditioning, mask] as diffusers' prepare_latents builds it."""
    mask = torch.zeros_like(latents[..., :1])
    if first_frame is not None:
        latents = latents.clone()
        latents[:, :1] = first_frame
        mask[:, :1] = 1
    return torch.cat([latents, torch.zeros_like(latents), mask], -1)


def original_normalize_first_frame(latents):
    """Difference 9: kandinsky/generation_utils.py normalize_first_frame on each video [T, H, W, C], written out:
    frames 0..3 each moved from their own mean/std towards those of frames 4..4+min(5, T-1), clamped to
    [mean - 0.05, mean + 0.1] and [std - 0.1, std + 0.25]."""
    out = latents.clone()
    for b, video in enumerate(latents):
        source, reference = video[:4], video[4 : 4 + min(5, video.shape[0] - 1)]
        mean, std = source.mean(dim=(1, 2, 3), keepdim=True), source.std(dim=(1, 2, 3), keepdim=True)
        ref_mean = torch.clamp(reference.mean(), mean - 0.05, mean + 0.1)
        ref_std = torch.clamp(reference.std(), std - 0.1, std + 0.25)
        out[b, :4] = (source - mean) / std * ref_std + ref_mean
    return out


@torch.no_grad()
def test_t2v_final_latents_equal_diffusers(ours, t2v):
    req = Request(prompt="a red fox runs through the snow", height=64, width=64, num_frames=5, steps=3, seed=11,
                  guidance_scale=5.0)
    want = ours.generate(req).latents

    sigmas = feed_schedule(t2v, ours, req)
    t2v._get_scale_factor = original_scale_factor(req)
    noise = initial_noise(req.latent_shape(), req.seed)
    got = t2v(height=req.height, width=req.width, num_frames=req.num_frames, num_inference_steps=req.steps,
              guidance_scale=req.guidance_scale, latents=with_visual_cond(noise), output_type="latent",
              **feed_text(ours, req)).frames
    assert torch.equal(t2v.scheduler.sigmas, torch.cat([sigmas[:-1], torch.zeros(1)]))  # ours, fed as intended
    assert got.shape == want.shape == (1, 2, 8, 8, 16)
    assert rel_err(got, want) <= TOL
    assert rel_err(noise, want) > 0.1  # the sampler moved far from the noise: the comparison is not vacuous


@torch.no_grad()
def test_i2v_final_latents_equal_diffusers(ours, t2v, tmp_path):
    rgb = (np.random.default_rng(5).random((50, 70, 3)) * 255).astype(np.uint8)
    path = tmp_path / "cat.png"
    Image.fromarray(rgb).save(path)
    # Area 64 x 96, 17 frames: 5 latent frames, so the first-frame renormalisation has a reference frame.
    req = Request(prompt="the cat starts to run", image=str(path), height=64, width=96, num_frames=17, steps=2,
                  seed=3, guidance_scale=5.0)
    want = ours.generate(req).latents

    i2v = Kandinsky5I2VPipeline(**t2v.components)
    feed_schedule(i2v, ours, req)
    i2v._get_scale_factor = original_scale_factor(req)
    i2v.normalize_first_frame = original_normalize_first_frame
    height, width = frame_size(req, nabla=False)  # difference 7; the rule itself is tested in test_i2v.py
    image = original_first_frame_image(path, req.height * req.width, 16)
    assert (height, width) == tuple(image.shape[1:]) == (64, 96)
    posterior = i2v.vae.encode(image[None, :, None]).latent_dist
    image_latent = posterior.sample(generator=torch.Generator().manual_seed(req.seed)) * i2v.vae.config.scaling_factor
    noise = initial_noise(req.latent_shape((height, width)), req.seed)
    latents = with_visual_cond(noise, image_latent.permute(0, 2, 3, 4, 1))
    got = i2v(image=Image.open(path), height=height, width=width, num_frames=req.num_frames,
              num_inference_steps=req.steps, guidance_scale=req.guidance_scale, latents=latents.clone(),
              output_type="latent", **feed_text(ours, req)).frames
    assert got.shape == want.shape == (1, 5, 8, 12, 16)
    assert rel_err(got, want) <= TOL
    assert rel_err(noise[:, 1:], want[:, 1:]) > 0.1  # the sampler moved far from the noise: not vacuous
