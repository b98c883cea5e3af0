"""Image files as the engine reads them: as displayed, i.e. with the EXIF orientation applied (a phone photo stored
sideways with an orientation tag is the upright picture), RGB (alpha dropped, greyscale expanded). The one loader of
I2V's first frame, I2I's source image, and the image a prompt expansion looks at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps  # a dependency of diffusers, so always installed with it

# EXIF orientations 5-8 turn the stored image by 90 degrees (transposed, rotated 270, transversed, rotated 90).
_QUARTER_TURNS = (5, 6, 7, 8)
_ORIENTATION = 0x0112


def _unreadable(path, e: Exception) -> ValueError:
    return ValueError(f"image {path} is not a readable image file: {e}")


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as displayed, from its header (no pixel is decoded)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(_ORIENTATION, 1)
    except (OSError, ValueError) as e:  # PIL raises UnidentifiedImageError (an OSError) for non-images
        raise _unreadable(path, e) from None
    return (w, h) if orientation in _QUARTER_TURNS else (h, w)


def open_image(path: str | Path) -> Image.Image:
    """The image as displayed, RGB, loaded (the file is closed)."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def load_rgb(path: str | Path) -> torch.Tensor:
    """The image as displayed: uint8 RGB [3, H, W]."""
    rgb = np.asarray(open_image(path))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
