"""One image loader for I2V and I2I (engine/media/image.py): a photo stored sideways with an EXIF orientation tag is
read as the upright picture it displays as, for the size of an I2V video, its first frame, and an I2I source.

The reference is independent of the loader: the upright picture is made by hand (a pattern with no symmetry), the
stored file is that picture turned by PIL's own transpose, with the EXIF tag that undoes the turn (EXIF 2.3: 6 means
"rotate 90 degrees clockwise to display", 3 "rotate 180", 8 "rotate 90 counter-clockwise"). PNG is lossless, so
the pixels must match exactly."""

import numpy as np
import pytest
import torch
from PIL import Image

from k5.engine.media.image import image_size, load_rgb
from k5.engine.pipelines.image_request import image_size as i2i_size
from k5.engine.pipelines.image_request import load_source
from k5.engine.pipelines.video import Request, frame_size
from k5.engine.sampling.i2v import load_image, prepare_image

# stored = upright.transpose(turn): the tag says how to turn the stored picture back.
STORED = {6: Image.Transpose.ROTATE_90, 3: Image.Transpose.ROTATE_180, 8: Image.Transpose.ROTATE_270}


def upright_picture() -> Image.Image:
    """48 x 80 (portrait: taller than wide), every pixel distinct, so any turn or flip changes it."""
    h, w = 80, 48
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 5, y * 3, (x * 7 + y * 11) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture
def files(tmp_path):
    upright = upright_picture()
    upright.save(tmp_path / "upright.png")
    out = {"upright": tmp_path / "upright.png"}
    for tag, turn in STORED.items():
        exif = Image.Exif()
        exif[0x0112] = tag
        stored = upright.transpose(turn)
        stored.save(tmp_path / f"tag{tag}.png", exif=exif)
        out[tag] = tmp_path / f"tag{tag}.png"
    return out


@pytest.mark.parametrize("tag", sorted(STORED))
def test_a_tagged_photo_reads_as_the_upright_picture(files, tag):
    upright = load_rgb(files["upright"])
    assert tuple(upright.shape) == (3, 80, 48)
    with Image.open(files[tag]) as im:  # the file itself holds the turned pixels
        assert im.size != (48, 80) or tag == 3
        assert not np.array_equal(np.asarray(im.convert("RGB")), np.asarray(upright_picture()))
    assert torch.equal(load_rgb(files[tag]), upright)
    assert image_size(files[tag]) == image_size(files["upright"]) == (80, 48)


@pytest.mark.parametrize("tag", sorted(STORED))
def test_i2v_and_i2i_read_the_photo_alike(files, tag):
    # I2I's source and I2V's first frame are the same pixels, the upright ones (I2V read the stored pixels before).
    assert torch.equal(load_source(files[tag]), load_rgb(files["upright"]))
    assert torch.equal(load_image(files[tag]), load_rgb(files["upright"]).float() / 255)
    assert i2i_size(files[tag]) == (80, 48)
    # The I2V video takes the displayed aspect ratio (portrait), and its conditioning frame is the upright one.
    req = Request("a fox", image=str(files[tag]), height=512, width=768, num_frames=5, steps=1)
    want = frame_size(Request("a fox", image=str(files["upright"]), height=512, width=768, num_frames=5, steps=1),
                      nabla=False)
    assert frame_size(req, nabla=False) == want and want[0] > want[1]
    assert torch.equal(prepare_image(load_image(files[tag]), *want),
                       prepare_image(load_image(files["upright"]), *want))
