import math
import types

import numpy as np
import pytest
import torch
from diffusers import Kandinsky5I2VPipeline
from PIL import Image

from k5.engine.i2v import encode_image, load_image, normalize_first_frame, prepare_image, size_for_area
from k5.engine.vae import VideoVAE
from test_vae import SMALL_TILES, tiny_vae


def diffusers_normalize_first_frame(latents):
    # The pipeline method only uses its static helper, so a namespace carrying that helper stands in for `self`.
    pipe = types.SimpleNamespace(adaptive_mean_std_normalization=Kandinsky5I2VPipeline.adaptive_mean_std_normalization)
    return Kandinsky5I2VPipeline.normalize_first_frame(pipe, latents)


def random_latents(batch, frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Frame-dependent offset and scale, so that the clamps of the normalisation are active for some frames.
    scale = torch.linspace(0.6, 1.4, frames).view(1, frames, 1, 1, 1)
    shift = torch.linspace(-0.3, 0.3, frames).view(1, frames, 1, 1, 1)
    return torch.randn(batch, frames, 4, 6, 16, generator=g) * scale + shift


@pytest.mark.parametrize("frames", [5, 6, 9, 31])
def test_normalize_first_frame_equals_diffusers(frames):
    latents = random_latents(2, frames)
    before = latents.clone()
    ours = normalize_first_frame(latents)
    ref = diffusers_normalize_first_frame(latents)
    assert torch.equal(latents, before)  # input untouched
    assert (ours - ref).abs().max().item() <= 1e-6
    assert not torch.allclose(ours[:, :4], latents[:, :4])  # it did change the first frames
    assert torch.equal(ours[:, 4:], latents[:, 4:])


def test_normalize_first_frame_per_frame_statistics():
    # The original repo normalises each of the first 4 frames on its own; check the defining property:
    # after it, frame f has mean clamp(ref_mean, m_f - 0.05, m_f + 0.1) and std clamp(ref_std, s_f - 0.1, s_f + 0.25).
    latents = random_latents(1, 9, seed=3)
    out = normalize_first_frame(latents, per_frame=True)
    ref = latents[0, 4:9]
    for f in range(4):
        m, s = latents[0, f].mean(), latents[0, f].std()
        assert out[0, f].mean().item() == pytest.approx(ref.mean().clamp(m - 0.05, m + 0.1).item(), abs=1e-5)
        assert out[0, f].std().item() == pytest.approx(ref.std().clamp(s - 0.1, s + 0.25).item(), abs=1e-5)
    # The joint (diffusers) version instead matches the statistics of the 4 frames taken together.
    joint = normalize_first_frame(latents)
    m, s = latents[0, :4].mean(), latents[0, :4].std()
    assert joint[0, :4].mean().item() == pytest.approx(ref.mean().clamp(m - 0.05, m + 0.1).item(), abs=1e-5)
    assert joint[0, :4].std().item() == pytest.approx(ref.std().clamp(s - 0.1, s + 0.25).item(), abs=1e-5)


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_normalize_first_frame_without_reference_frames_is_identity(frames):
    latents = random_latents(1, frames)
    assert torch.equal(normalize_first_frame(latents), latents)


def test_encode_image_matches_library_untiled():
    vae = tiny_vae()
    torch.manual_seed(4)
    img = torch.rand(3, 48, 64) * 2 - 1
    x = img[None, :, None]
    sf = vae.config.scaling_factor
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist  # untiled: the tiny VAE has tiling off here
        ref_mode = (posterior.mode() * sf).permute(0, 2, 3, 4, 1)
        ref_sample = (posterior.sample(generator=torch.Generator().manual_seed(7)) * sf).permute(0, 2, 3, 4, 1)
    # Our VAE has (small) spatial tiling on for decoding; the encode must still be the untiled one.
    wrapped = VideoVAE(vae, **SMALL_TILES)
    mode = encode_image(wrapped, img, sample=False)
    sample = encode_image(wrapped, img, generator=torch.Generator().manual_seed(7))
    assert mode.shape == (1, 1, 6, 8, 16)
    assert (mode - ref_mode).abs().max().item() <= 1e-6
    assert (sample - ref_sample).abs().max().item() <= 1e-6
    assert not torch.allclose(mode, sample)
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_image(wrapped, torch.zeros(3, 50, 64))


def test_load_and_prepare_image(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, np.arange(30, dtype=np.uint8)[None] * 8, 51
    Image.fromarray(rgb).save(tmp_path / "im.png")
    img = load_image(tmp_path / "im.png")
    assert img.shape == (3, 20, 30) and img.dtype == torch.float32
    assert torch.equal(img, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    same = prepare_image(img, 20, 30)
    assert torch.equal(same, img * 2 - 1)
    resized = prepare_image(img, 16, 48)
    assert resized.shape == (3, 16, 48)
    assert torch.allclose(resized[0], torch.ones(16, 48))  # a constant channel stays constant
    assert torch.allclose(resized[2], torch.full((16, 48), 51 / 255 * 2 - 1), atol=1e-6)
    assert resized[1, :, 0].mean() < resized[1, :, -1].mean()  # the ramp keeps its direction


def test_size_for_area_by_hand():
    # 1080x1920 to area 512*768: k = sqrt(393216 / 2073600) / 16 = 0.027217; 1080k = 29.39 -> 29, 1920k = 52.26 -> 52
    assert size_for_area(1080, 1920, 512 * 768, 16) == (29 * 16, 52 * 16)
    h, w = size_for_area(1024, 1024, 1024 * 1024, 128)
    assert (h, w) == (1024, 1024) and math.gcd(h, w) % 128 == 0
