"""uint8 RGB image -> PNG, written under a temporary name and published only when complete and checked
(engine.media.mp4.write_published): a crash or a full disk never leaves a truncated PNG under the final name, and a
finished file is never replaced.

The check (``check_png``) decodes the written file again: PNG is lossless, so it must hold exactly the pixels that
were written (their sha256), at the written size. A write the filesystem refused raises OSError from the save.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from k5.engine.media.mp4 import write_published


def _check_image(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]  # one frame, as ImagePipeline.decode returns it
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] (or one frame [1, H, W, 3]), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return np.ascontiguousarray(image)


class UnreadableImage(RuntimeError):
    """A written PNG that does not decode to the pixels that were written (never published)."""


def sha256_pixels(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def encode_png(image, path: str | Path, metadata: dict[str, str] | None = None) -> dict:
    """Write uint8 RGB [H, W, 3] (or one frame [1, H, W, 3]) as PNG to exactly ``path`` (replacing it), check it
    (``check_png``) and return what it holds: {"width", "height", "pixels_sha256"}."""
    image = _check_image(image)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    with open(path, "wb") as f:
        Image.fromarray(image, "RGB").save(f, format="PNG", pnginfo=info)
        f.flush()
        os.fsync(f.fileno())
    expect = {"width": image.shape[1], "height": image.shape[0], "pixels_sha256": sha256_pixels(image)}
    check_png(path, **expect)
    return expect


def check_png(path: str | Path, width: int, height: int, pixels_sha256: str | None = None) -> dict:
    """Decode ``path`` whole: raise UnreadableImage unless it is an RGB PNG of ``width`` x ``height`` (and, given
    ``pixels_sha256``, exactly those pixels). Returns what it found."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes every row: a truncated file raises here
            found = {"format": im.format, "mode": im.mode, "width": im.size[0], "height": im.size[1]}
            pixels = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for damaged or truncated files
        raise UnreadableImage(f"{path} is not a readable PNG image: {e}") from None
    want = {"format": "PNG", "mode": "RGB", "width": width, "height": height}
    wrong = [f"{k} {found[k]} (written {v})" for k, v in want.items() if found[k] != v]
    if not wrong and pixels_sha256 is not None and sha256_pixels(pixels) != pixels_sha256:
        wrong = ["its pixels differ from those written"]
    if wrong:
        raise UnreadableImage(f"{path} is not the PNG image that was written: {', '.join(wrong)}")
    return found


def write_png(image, path: str | Path, metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write uint8 RGB [H, W, 3] to ``path`` as PNG; ``metadata`` goes into tEXt chunks (prompt, seed, ...).

    The image is written under a temporary name, checked (``encode_png``) and only then moved into place
    (``engine.media.mp4.write_published``: an existing ``path`` is refused unless ``overwrite``).
    """
    image = _check_image(image)
    return write_published(path, lambda tmp: encode_png(image, tmp, metadata), ".png", overwrite)
