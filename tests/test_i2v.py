import math
import types

import numpy as np
import pytest
import torch
from diffusers import Kandinsky5I2VPipeline
from PIL import Image

from k5.engine.model.config import DiTConfig
from k5.engine.sampling.i2v import encode_image, load_image, normalize_first_frame, prepare_image, size_for_area
from k5.engine.pipelines.video import Request, check_request, frame_size
from k5.engine.vae.video import VideoVAE
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
    assert torch.equal(same, torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1)  # the original's x / 127.5 - 1
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


def original_first_frame_image(path, max_area: int, divisibility: int) -> torch.Tensor:
    """The original I2V pipeline's image preparation (kandinsky/i2v_pipeline.py get_first_frame_from_image and
    resize_image), written out: the PIL RGB image as a uint8 tensor [1, 3, h, w]; k = sqrt(max_area / (h * w)) /
    divisibility; sides int(round(side * k) * divisibility); torchvision.transforms.functional.resize on that uint8
    tensor at its defaults (bilinear, antialias=True, computed in float32 and rounded back to uint8; nothing to do at
    the same size); then x / 127.5 - 1. No crop. Returns [3, new_h, new_w]."""
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)[None]
    h, w = image.shape[2:]
    k = math.sqrt(max_area / (h * w)) / divisibility
    new_h, new_w = int(round(h * k) * divisibility), int(round(w * k) * divisibility)
    if (new_h, new_w) != (h, w):
        image = torch.nn.functional.interpolate(image.float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                                                align_corners=False).round().to(torch.uint8)
    return image[0] / 127.5 - 1.0


def random_image(path, height, width, seed=0):
    rgb = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return str(path)


# (image height, width), the requested --height x --width, NABLA -> the original's (max_area, divisibility).
# Its resolution 512 is max_area 512*768 with sides multiples of 16, its 1024 is 1024*1024 with multiples of 128;
# NABLA needs multiples of 128 whatever the area (our rule: the original runs NABLA only at 1024).
FITS = [
    ((300, 200), (512, 768), False, (512 * 768, 16)),
    ((123, 457), (512, 768), False, (512 * 768, 16)),
    ((720, 1280), (512, 768), False, (512 * 768, 16)),  # a larger image is scaled down
    ((300, 500), (1024, 1024), False, (1024 * 1024, 128)),
    ((300, 500), (512, 768), True, (512 * 768, 128)),
    ((50, 70), (64, 96), False, (64 * 96, 16)),  # the tiny sizes of the end-to-end tests
]


@pytest.mark.parametrize("image_hw, budget, nabla, rule", FITS)
def test_i2v_fit_is_the_originals(tmp_path, image_hw, budget, nabla, rule):
    path = random_image(tmp_path / "im.png", *image_hw)
    want = original_first_frame_image(path, *rule)
    req = Request(prompt="a cat", image=path, height=budget[0], width=budget[1])
    size = frame_size(req, nabla)
    assert size == tuple(want.shape[1:])
    # Bitwise: the same interpolate call on the same 8-bit values in the same (channels-last) layout, then rounding.
    assert torch.equal(prepare_image(load_image(path), *size), want)
    check_request(req, DiTConfig(visual_cond=True), nabla)  # a fitted size always passes the request checks


def test_i2v_fit_refuses_what_it_cannot_size(tmp_path):
    cfg = DiTConfig(visual_cond=True)
    # 1x200 at the area 64*64: k = sqrt(4096 / 200) / 16 = 0.28, so the height rounds to 0.
    narrow = Request(prompt="a cat", image=random_image(tmp_path / "line.png", 1, 200), height=64, width=64)
    with pytest.raises(ValueError, match="too narrow .* the video would be 0x"):
        check_request(narrow, cfg, nabla=False)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not an image file Pillow can read"):
        check_request(Request(prompt="a cat", image=str(tmp_path / "notes.png")), cfg, nabla=False)
