"""uint8 RGB image -> PNG, written under a temporary name and published only when complete (engine.video.publish):
a crash never leaves a truncated PNG under the final name, and a finished file is never replaced."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .video import publish, shareable


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


def write_png(image, path: str | Path, metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write uint8 RGB [H, W, 3] to ``path`` as PNG; ``metadata`` goes into tEXt chunks (prompt, seed, ...).

    ``overwrite=False`` raises FileExistsError when ``path`` exists, checked before encoding and again, atomically,
    when the finished file is moved into place.
    """
    image = _check_image(image)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial.png")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image, "RGB").save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            shareable(tmp)
            os.replace(tmp, path)
        else:
            publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
