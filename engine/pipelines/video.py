"""Text/image to video on one device: text encoders -> DiT sampling -> VAE decode.

A request is validated against the checkpoint's config before any weight is loaded, so bad input fails in a second
with one message. Parallel runs use the same pipeline: k5.parallel applies itself to ``pipeline.dit`` and replaces
the decode, and the launch script decides which rank writes what.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from k5.engine.encoders.text import DEFAULT_NEGATIVE_PROMPT
from k5.engine.model.config import DiTConfig
# Result, Sharing, make_expander, expand_or_reuse, scheduler_shift: shared with the image pipeline, imported from here
# by existing callers too.
from k5.engine.pipelines.base import (Pipeline, Prepared, Result, Sharing, expand_or_reuse,  # noqa: F401
                                      make_expander, scheduler_shift)
from k5.engine.sampling.sampler import Conditioning, initial_noise, uses_cfg
from k5.engine.vae.video import VideoVAE, vae_dtype

LATENT_CHANNELS = 16


@dataclass
class Request:
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    height: int = 512
    width: int = 768
    num_frames: int = 121
    steps: int = 50
    guidance_scale: float = 5.0
    shift: float | None = None  # None: the checkpoint's scheduler config, else 5.0
    seed: int = 0
    image: str | None = None  # I2V conditioning image; height x width is then the area (see frame_size)

    def latent_shape(self, size: tuple[int, int] | None = None) -> tuple[int, int, int, int, int]:
        height, width = size or (self.height, self.width)
        return (1, (self.num_frames - 1) // 4 + 1, height // 8, width // 8, LATENT_CHANNELS)


def hd_bucket(height: int, width: int) -> bool:
    # The original has two resolutions, 512 (sizes with sides <= 768) and 1024 (a side >= 1024); they set the RoPE
    # scale and, for I2V, the area and side multiple. Every released size falls on the side of 854 it belongs to,
    # which is also diffusers' 854-pixel rule.
    return max(height, width) > 854


def frame_size(req: Request, nabla: bool) -> tuple[int, int]:
    """(height, width) of the video. Text-to-video: as asked. Image-to-video: as the original I2V pipeline sizes it,
    from the image: its aspect ratio at the area height x width (the original's 512x768 at resolution 512,
    1024x1024 at 1024), sides rounded to multiples of 16, or of 128 in the 1024 bucket (the original's rule) and
    under NABLA (8x8 tiles of 16-pixel patches). The image is then resized to it with no crop."""
    if req.image is None:
        return req.height, req.width
    from k5.engine.media.image import image_size
    from k5.engine.sampling.i2v import size_for_area

    step = 128 if nabla or hd_bucket(req.height, req.width) else 16
    return size_for_area(*image_size(req.image), req.height * req.width, step)


def check_request(req: Request, cfg: DiTConfig, nabla: bool) -> None:
    """Raise ValueError naming what is wrong with the request and what would be right."""
    if not req.prompt or not req.prompt.strip():
        raise ValueError("the prompt is empty; give a text describing the video")
    step = 128 if nabla else 16
    for name, value in (("height", req.height), ("width", req.width)):
        if value <= 0 or value % step:
            why = " (NABLA attention works on 8x8 tiles of 16-pixel patches)" if nabla else ""
            near = max(step, round(value / step) * step)
            raise ValueError(f"{name} {value} is not a positive multiple of {step}{why}; try {near}")
    if req.num_frames < 1 or (req.num_frames - 1) % 4:
        k = max(0, round((req.num_frames - 1) / 4))
        raise ValueError(
            f"num_frames {req.num_frames} is not of the form 4k+1 (the VAE compresses time 4x); try {4 * k + 1}"
        )
    if req.steps < 1:
        raise ValueError(f"steps must be at least 1, got {req.steps}")
    if not math.isfinite(req.guidance_scale) or req.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {req.guidance_scale}")
    if req.shift is not None and (not math.isfinite(req.shift) or req.shift <= 0):
        raise ValueError(f"shift must be a finite number > 0, got {req.shift}")
    height, width = req.height, req.width
    if req.image is not None:
        if not cfg.visual_cond:
            raise ValueError("this checkpoint has no visual_cond input, so it cannot condition on an image")
        if not Path(req.image).is_file():
            raise ValueError(f"image {req.image} is not a readable file")
        try:
            height, width = frame_size(req, nabla)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"image {req.image} is not an image file Pillow can read ({e})") from None
        if min(height, width) < 16:
            raise ValueError(
                f"image {req.image} is too narrow for its aspect ratio to fit the area {req.height}x{req.width}: "
                f"the video would be {height}x{width}; crop the image or give a larger --height x --width"
            )
    T, H, W = (req.num_frames - 1) // 4 + 1, height // 16, width // 16
    if max(T, H, W) > 128:
        warnings.warn(f"latent grid {T}x{H}x{W} exceeds the 128 positions per axis the model was trained with")


def rope_scale(height: int, width: int) -> tuple[float, float, float]:
    # The original's RoPE scale by resolution bucket (its configs' scale_factor): (1,2,2) at 512, (1,3.16,3.16) at
    # 1024. For I2V the bucket is the one of the requested area, as the original's comes from its config.
    return (1.0, 3.16, 3.16) if hd_bucket(height, width) else (1.0, 2.0, 2.0)


class Kandinsky5Pipeline(Pipeline):
    """The video pipeline (T2V, I2V): the shared skeleton (engine/pipelines/base.py) with the HunyuanVideo VAE, the
    video prompt template, the RoPE scale of the request's resolution bucket and, for I2V, the first frame's latent
    held in place."""

    @classmethod
    def load_vae(cls, root: Path, device: torch.device, home: torch.device) -> VideoVAE:
        return VideoVAE.from_pretrained(root, torch_dtype=vae_dtype(device), device=home)

    def default_task(self, req: Request) -> str:
        return "i2v" if req.image else "t2v"

    def velocity(self, inp: Tensor, t: Tensor, c: Conditioning, scale_factor, **dit_kwargs) -> Tensor:
        return self.dit(inp, c.embeds, c.pooled, t, scale_factor=scale_factor, text_mask=c.mask, **dit_kwargs)

    def first_frame(self, req: Request, size: tuple[int, int]) -> Tensor | None:
        if req.image is None:
            return None
        from k5.engine.sampling.i2v import encode_image, load_image, prepare_image

        def encode():
            img = prepare_image(load_image(req.image), *size)
            g = torch.Generator("cpu").manual_seed(req.seed)
            with self.on_device("vae"):
                return encode_image(self.vae, img, generator=g).float().to(self.device)

        return self.sharing.image(encode)

    def prepare(self, req: Request, prompt: str | None) -> Prepared:
        prompts = [req.prompt if prompt is None else prompt]
        prompts += [req.negative_prompt] if uses_cfg(req.guidance_scale) else []
        conds, truncated = self.encode(prompts)
        size = frame_size(req, self.dit.nabla is not None)
        first = self.first_frame(req, size)
        sf = rope_scale(req.height, req.width)

        def finish(latents: Tensor) -> Tensor:
            if first is None:
                return latents
            from k5.engine.sampling.i2v import normalize_first_frame

            return normalize_first_frame(latents, per_frame=True)  # the original repo: per frame

        return Prepared(lambda inp, t, c, **kw: self.velocity(inp, t, c, sf, **kw),
                        lambda: initial_noise(req.latent_shape(size), req.seed, self.device), conds[0],
                        conds[1] if len(conds) > 1 else None, truncated[0], visual_cond=self.dit.config.visual_cond,
                        first_frame=first, finish=finish)

    def decoded(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents)[0]
