"""The pipeline on the tiny checkpoint: what reaches the DiT at each step (CFG branches, I2V conditioning)."""

import numpy as np
import pytest
import torch
from PIL import Image

from k5.engine.sampling.i2v import encode_image, load_image, normalize_first_frame, prepare_image
from k5.engine.pipelines.video import Kandinsky5Pipeline, Request
from k5.engine.sampling.sampler import timesteps
from k5.engine.encoders.text import DEFAULT_NEGATIVE_PROMPT
from k5.engine.catalogue.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def pipe():
    return Kandinsky5Pipeline.from_pretrained(tiny_checkpoint(), dtype=torch.float32)


def record_calls(pipe, monkeypatch):
    calls = []
    forward = pipe.dit.forward

    def recording(x, text_embeds, pooled, t, **kw):
        calls.append(dict(x=x.clone(), text=text_embeds.clone(), t=t.clone()))
        return forward(x, text_embeds, pooled, t, **kw)

    monkeypatch.setattr(pipe.dit, "forward", recording)
    return calls


def small(**kw):
    return Request(**{**dict(prompt="a cat on a sofa", height=64, width=64, num_frames=5, steps=3, seed=1), **kw})


def test_cfg_runs_cond_and_negative_prompt_each_step(pipe, monkeypatch):
    calls = record_calls(pipe, monkeypatch)
    pipe.generate(small(guidance_scale=5.0))
    assert len(calls) == 6  # 3 steps x (cond, uncond)
    cond, neg = pipe.text.encode(["a cat on a sofa", DEFAULT_NEGATIVE_PROMPT]).embeds
    for i in range(3):
        assert torch.equal(calls[2 * i]["text"][0], cond) and torch.equal(calls[2 * i + 1]["text"][0], neg)
        # fp32 t*1000 of the shifted schedule (shift 5 from the tiny scheduler config)
        want_t = timesteps(3, 5.0)[i] * 1000
        assert calls[2 * i]["t"].dtype == torch.float32 and torch.allclose(calls[2 * i]["t"], want_t.expand(1))


def test_no_uncond_pass_without_guidance(pipe, monkeypatch):
    calls = record_calls(pipe, monkeypatch)
    pipe.generate(small(guidance_scale=1.0))
    assert len(calls) == 3


def test_i2v_overwrites_first_latent_frame_every_step(pipe, monkeypatch, tmp_path):
    rgb = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    path = tmp_path / "cat.png"
    Image.fromarray(rgb).save(path)
    req = small(guidance_scale=1.0, image=str(path), num_frames=21)  # 6 latent frames: normalisation applies
    # The video takes the image's aspect ratio at the area 64x64 (the original's fit, test_i2v.py): k =
    # sqrt(4096 / (48 * 80)) / 16; 48k = 3.1 -> 3 * 16 = 48, 80k = 5.2 -> 5 * 16 = 80.
    g = torch.Generator("cpu").manual_seed(req.seed)
    image_latent = encode_image(pipe.vae, prepare_image(load_image(path), 48, 80), generator=g).float()
    raw = []
    monkeypatch.setattr("k5.engine.sampling.i2v.normalize_first_frame",
                        lambda x, **kw: raw.append(x.clone()) or normalize_first_frame(x, **kw))
    calls = record_calls(pipe, monkeypatch)
    out = pipe.generate(req).latents
    assert out.shape == (1, 6, 48 // 8, 80 // 8, 16)
    for c in calls:
        x = c["x"]
        assert torch.equal(x[:, :1, ..., :16], image_latent)  # frame 0 is the image latent at every step
        assert torch.count_nonzero(x[..., 16:32]) == 0  # visual_cond channels stay zero
        assert torch.equal(x[0, :, 0, 0, 32], torch.tensor([1.0, 0, 0, 0, 0, 0]))  # mask marks frame 0
    assert torch.equal(raw[0][:, :1], image_latent)  # the sampled latent keeps the image frame
    # the original's per-frame normalisation of the first 4 frames, worked out here
    ref = raw[0][0, 4:9]
    for f in range(4):
        src = raw[0][0, f]
        mean = ref.mean().clamp(src.mean() - 0.05, src.mean() + 0.1)
        std = ref.std().clamp(src.std() - 0.1, src.std() + 0.25)
        assert torch.allclose(out[0, f], (src - src.mean()) / src.std() * std + mean, atol=1e-5)
    assert torch.equal(out[:, 4:], raw[0][:, 4:])
