"""Image Lite requests: buckets, task, source-image preparation and the bad-input checks, against the original's rules
written out here and hand-worked values (no weights: all of this runs before loading)."""

import numpy as np
import pytest
import torch
from PIL import Image

from k5.engine.model.config import PRESETS
from k5.engine.pipelines.image_request import (BUCKETS, ImageRequest, check_task, fit_to_bucket, grid_tokens, image_size, load_source,
                             nearest_bucket, qwen_image, reject_image_settings, reject_video_settings, resolve,
                             vae_input)

T2I = PRESETS["image-lite"]
I2I = T2I.replace(visual_cond=True)


def save(tmp_path, h, w, name="src.png", exif_orientation=None):
    rgb = (np.random.default_rng(h * w).random((h, w, 3)) * 255).astype(np.uint8)
    path = tmp_path / name
    im = Image.fromarray(rgb)
    if exif_orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)
    return path, rgb


def test_image_lite_config_is_the_reference():
    # configs/config_t2i.yaml dit_params, written out: model_dim 2560, ff 10240, 2 text / 50 visual blocks,
    # axes 32/48/48 (head 128 -> 20 heads), time 512; I2I adds instruct_type "channel" -> 33 input channels.
    assert (T2I.model_dim, T2I.ff_dim, T2I.num_text_blocks, T2I.num_visual_blocks) == (2560, 10240, 2, 50)
    assert (T2I.axes_dims, T2I.num_heads, T2I.time_dim, T2I.patch_size) == ((32, 48, 48), 20, 512, (1, 2, 2))
    assert (T2I.in_channels, I2I.in_channels) == (16, 33)
    assert PRESETS["image-lite-i2i"] == I2I


def test_buckets_and_nearest_follow_the_original():
    assert BUCKETS == ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896))

    def find_nearest(real):  # kandinsky/i2i_pipeline.py, written out: argmin |h/w - H/W|, first on ties
        ratios = [abs(b[0] / b[1] - real[0] / real[1]) for b in BUCKETS]
        return BUCKETS[int(np.argmin(ratios))]

    for size in [(1000, 1000), (700, 900), (900, 700), (480, 1920), (3000, 1000), (1080, 1920), (1, 1)]:
        assert nearest_bucket(*size) == find_nearest(size)
    assert nearest_bucket(1080, 1920) == (768, 1280)  # 16:9 = 0.5625: 0.6 is nearer than 0.4545 (640x1408)
    assert nearest_bucket(480, 1920) == (640, 1408)  # 0.25: the widest bucket
    assert grid_tokens(1024, 1024) == 4096 and grid_tokens(640, 1408) == 40 * 88


def test_resolve_t2i_defaults_and_snapping():
    r = resolve(ImageRequest("a cat"), T2I)
    assert (r.task, r.height, r.width, r.notes) == ("t2i", 1024, 1024, [])
    r = resolve(ImageRequest("a cat", height=1280, width=768), T2I)
    assert (r.height, r.width, r.notes) == (1280, 768, [])
    r = resolve(ImageRequest("a cat", height=512, width=768), T2I)
    assert (r.height, r.width) == (768, 1280)  # 0.667 -> 0.6 (768x1280) is the nearest ratio
    assert len(r.notes) == 1 and "512x768 is not one of the sizes" in r.notes[0] and "using 768x1280" in r.notes[0]
    assert "1024x1024, 640x1408" in r.notes[0]
    assert resolve(r, T2I).notes == r.notes  # resolving again changes nothing more


def test_resolve_i2i_takes_the_source_bucket(tmp_path):
    path, _ = save(tmp_path, 300, 700)
    r = resolve(ImageRequest("make it night", image=str(path)), I2I)
    assert (r.task, r.height, r.width) == ("i2i", 640, 1408)
    r = resolve(ImageRequest("make it night", image=str(path), height=1024, width=1024), I2I)
    assert (r.height, r.width) == (1024, 1024)
    # An I2I checkpoint runs T2I only when asked (zeros in its edit channels, as the original without an image).
    assert resolve(ImageRequest("a cat", task="t2i"), I2I).task == "t2i"


def test_exif_orientation_is_applied(tmp_path):
    path, rgb = save(tmp_path, 30, 50, exif_orientation=6)  # stored 30x50 (h x w), displayed rotated: 50x30
    assert image_size(path) == (50, 30)
    img = load_source(path)
    assert img.shape == (3, 50, 30) and img.dtype == torch.uint8
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(np.rot90(rgb, k=-1).copy()))  # 90 degrees clockwise


@pytest.mark.parametrize("req, cfg, match", [
    (ImageRequest("  "), T2I, "prompt is empty"),
    (ImageRequest("edit"), I2I, "needs a source image: pass --image"),
    (ImageRequest("edit", task="i2i"), I2I, "needs a source image"),
    (ImageRequest("edit", image="x.png"), T2I, "text-to-image checkpoint"),
    (ImageRequest("a cat", image="x.png", task="t2i"), I2I, "takes no source image"),
    (ImageRequest("a cat", task="t2v"), T2I, "not an image task"),
    (ImageRequest("a cat", steps=0), T2I, "steps must be at least 1"),
    (ImageRequest("a cat", guidance_scale=-1), T2I, "guidance_scale"),
    (ImageRequest("a cat", shift=0), T2I, "shift must be > 0"),
    (ImageRequest("a cat", height=1024), T2I, "both height and width"),
    (ImageRequest("a cat", height=-8, width=1024), T2I, "height must be a positive"),
    (ImageRequest("edit", image="/nonexistent.png"), I2I, "not a readable image file"),
])  # fmt: skip
def test_bad_requests(req, cfg, match):
    with pytest.raises(ValueError, match=match):
        resolve(req, cfg)


def test_not_an_image_is_refused(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not a readable image file"):
        resolve(ImageRequest("edit", image=str(bad)), I2I)
    with pytest.raises(ValueError, match="not a readable image file"):
        load_source(bad)


def test_video_settings_on_an_image_model_and_the_reverse():
    reject_video_settings(num_frames=None, nabla=False, nabla_threshold=None)
    reject_video_settings(num_frames=1)  # one frame is an image
    with pytest.raises(ValueError, match="--num-frames is a video setting .* drop --num-frames"):
        reject_video_settings(num_frames=121)
    with pytest.raises(ValueError, match="--attention nabla is a video setting .*dense attention"):
        reject_video_settings(nabla=True)
    with pytest.raises(ValueError, match="--nabla-threshold"):
        reject_video_settings(nabla_threshold=0.9)
    with pytest.raises(TypeError, match="unknown video setting"):
        reject_video_settings(frames=3)
    reject_image_settings(task="t2v", output="out.mp4")
    with pytest.raises(ValueError, match="--task t2i needs an Image Lite checkpoint"):
        reject_image_settings(task="t2i")
    with pytest.raises(ValueError, match="writes MP4 videos, not PNG"):
        reject_image_settings(output="out/cat.PNG")
    check_task("i2i", image_model=True)
    check_task("i2v", image_model=False)
    with pytest.raises(ValueError, match="--task t2v makes a video"):
        check_task("t2v", image_model=True)
    with pytest.raises(ValueError, match="--task i2i needs an Image Lite"):
        check_task("i2i", image_model=False)
    with pytest.raises(ValueError, match="not one of t2v, i2v, t2i, i2i"):
        check_task("v2v", image_model=False)


def test_fit_to_bucket_covers_and_centre_crops():
    rng = np.random.default_rng(1)
    src = torch.from_numpy((rng.random((3, 1100, 1024)) * 255).astype(np.uint8))
    # Same width, taller: no resize (scale 1), rows (1100 - 1024) // 2 = 38 .. 1062 kept.
    assert torch.equal(fit_to_bucket(src, 1024, 1024), src[:, 38:1062])
    # Twice the bucket in both sides, plus 4 extra columns: halved (to 1024x706), then columns 1..705 kept.
    big = torch.from_numpy((rng.random((3, 2048, 1412)) * 255).astype(np.uint8))
    out = fit_to_bucket(big, 1024, 704)
    pil = np.asarray(Image.fromarray(big.permute(1, 2, 0).numpy()).resize((706, 1024), Image.BILINEAR))
    # torchvision's (and our) antialiased bilinear equals PIL's bilinear within one level
    diff = out.permute(1, 2, 0).int() - torch.from_numpy(pil[:, 1:705].copy()).int()
    assert out.shape == (3, 1024, 704) and diff.abs().max() <= 1
    with pytest.raises(ValueError, match="uint8 RGB image"):
        fit_to_bucket(src.float(), 1024, 1024)


def test_qwen_image_is_half_size_bilinear():
    rng = np.random.default_rng(2)
    img = torch.from_numpy((rng.random((3, 640, 1408)) * 255).astype(np.uint8))
    half = qwen_image(img)
    pil = np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((704, 320), Image.BILINEAR))
    assert half.shape == (320, 704, 3) and half.dtype == np.uint8
    assert np.abs(half.astype(int) - pil.astype(int)).max() <= 1


def test_vae_input_range():
    x = vae_input(torch.tensor([[[0, 255]], [[127, 128]], [[1, 254]]], dtype=torch.uint8))
    assert x.shape == (1, 3, 1, 2) and x[0, 0, 0].tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("preset", ["image-lite", "image-lite-i2i"])
def test_original_single_file_config_is_inferred(preset):
    """kandinsky5lite_t2i/i2i.safetensors carry no config: the shapes of a diffusers model built with the released
    config give it back (head 128 -> axes 32/48/48; 33 input channels -> the I2I edit input)."""
    from diffusers import Kandinsky5Transformer3DModel

    from k5.engine.checkpoints.state_dict import infer_k5_config

    want = PRESETS[preset].replace(num_visual_blocks=3)
    kwargs = {k: v for k, v in want.to_dict().items() if not k.startswith("_") and not k.startswith("attention")}
    with torch.device("meta"):
        ref = Kandinsky5Transformer3DModel(**kwargs)
    assert infer_k5_config({k: tuple(v.shape) for k, v in ref.state_dict().items()}) == want
