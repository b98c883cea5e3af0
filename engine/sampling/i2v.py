"""Image-to-video conditioning (architecture reference section 5.5).

The video takes the image's aspect ratio: the original repo sizes it by area (`size_for_area`; the pipeline's
`frame_size` applies it to a request) and resizes the image to that size without cropping (`prepare_image`).
The conditioning image is encoded by the video VAE as a one-frame video; its latent overwrites latent frame 0 of the
noisy video at every step (the pipeline does that), and after sampling the first latent frames are re-normalised
towards the statistics of the following ones (`normalize_first_frame`) before the decode.
"""

from __future__ import annotations

from math import sqrt
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLHunyuanVideo
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from k5.engine.media.image import load_rgb
from k5.engine.vae.video import VideoVAE


def load_image(path: str | Path) -> torch.Tensor:
    """An image file -> float32 RGB [3, H, W] in [0, 1], as displayed (engine/media/image.py: EXIF orientation
    applied, as for an I2I source image)."""
    return load_rgb(path).float().div_(255.0)


def size_for_area(height: int, width: int, max_area: int, divisibility: int = 16) -> tuple[int, int]:
    """The original repo's generation size for an image: its aspect ratio, area about `max_area` (SD 512*768,
    HD 1024*1024), sides rounded to multiples of `divisibility` (SD 16, HD 128)."""
    k = sqrt(max_area / (height * width)) / divisibility
    return int(round(height * k) * divisibility), int(round(width * k) * divisibility)


def prepare_image(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """RGB [3, h, w] in [0, 1] (from 8-bit pixels) -> [3, height, width] in [-1, 1], as the original repo does.

    The original resizes the uint8 image tensor with torchvision's default (bilinear with antialiasing, computed in
    float32 and rounded back to uint8), with no crop (`size_for_area` picks a size of the image's aspect ratio), and
    maps pixels by x / 127.5 - 1. Diffusers' I2V pipeline instead resizes PIL input with Lanczos.
    """
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(img.shape)}")
    x = (img.float() * 255.0).round()[None]  # the 8-bit values, exactly
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0.0, 255.0)  # back to uint8, as torchvision does for a uint8 tensor
    return (x[0] / 127.5 - 1.0).contiguous()


@torch.no_grad()
def encode_image(
    vae: VideoVAE | AutoencoderKLHunyuanVideo, img: torch.Tensor, generator: torch.Generator | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """Image(s) [3, H, W] or [B, 3, H, W] in [-1, 1] -> scaled latent [B, 1, H/8, W/8, 16] (channels-last).

    Draws a posterior sample (with `generator`) by default, because both the original repo and diffusers condition
    on `latent_dist.sample()` and the I2V model was trained that way; the latent std is small, so `sample=False`
    (the posterior mode) is close and needs no generator. The encode is untiled, as in both references (the
    original passes opt_tiling=False; diffusers' pipeline never enables tiling): the encoder and quant_conv are
    called directly so that the spatial tiling enabled on our VAE for decoding does not apply here.
    """
    ae = vae.vae if isinstance(vae, VideoVAE) else vae
    x = img[None] if img.ndim == 3 else img
    ratio = ae.config.spatial_compression_ratio
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % ratio or x.shape[-1] % ratio:
        raise ValueError(
            f"expected images [B, 3, H, W] with H and W multiples of {ratio}, got shape {tuple(x.shape)}"
        )
    x = x.to(device=ae.device, dtype=ae.dtype)[:, :, None]  # a 1-frame video [B, 3, 1, H, W]
    posterior = DiagonalGaussianDistribution(ae.quant_conv(ae.encoder(x)))
    z = posterior.sample(generator=generator) if sample else posterior.mode()
    return (z * ae.config.scaling_factor).permute(0, 2, 3, 4, 1)


def _renormalize(source: torch.Tensor, reference: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    source_mean = source.mean(dim=dims, keepdim=True)
    source_std = source.std(dim=dims, keepdim=True)
    # The references' constants: the first frames may move only a little towards the reference statistics.
    reference_mean = torch.clamp(reference.mean(), source_mean - 0.05, source_mean + 0.1)
    reference_std = torch.clamp(reference.std(), source_std - 0.1, source_std + 0.25)
    return (source - source_mean) / source_std * reference_std + reference_mean


def normalize_first_frame(
    latents: torch.Tensor, reference_frames: int = 5, per_frame: bool = False, num_first: int = 4,
) -> torch.Tensor:
    """Re-normalise latent frames [0, 4) of [B, T, H, W, C] towards the statistics of frames [4, 4+5).

    Default: diffusers' `Kandinsky5I2VPipeline.normalize_first_frame`, whose source statistics are taken over the
    four frames together per video and whose reference statistics over the whole batch. `per_frame=True`: the
    original repo's version (`generation_utils.normalize_first_frame` on [T, H, W, C]), source statistics per frame
    over (H, W, C), reference per video. The two agree only when the four frames share mean and std.

    With T <= 4 there is no reference frame; diffusers then returns NaN (T in 2..4) or a tuple (T = 1). We return
    the latents unchanged instead. Returns a new tensor.
    """
    if latents.ndim != 5:
        raise ValueError(f"expected latents [B, T, H, W, C], got shape {tuple(latents.shape)}")
    num_frames = latents.shape[1]
    if num_frames <= num_first:
        return latents.clone()
    out = latents.clone()
    reference = latents[:, num_first : num_first + min(reference_frames, num_frames - 1)]
    source = latents[:, :num_first]
    if per_frame:
        out[:, :num_first] = torch.stack(
            [_renormalize(s, r, dims=(1, 2, 3)) for s, r in zip(source, reference)]
        )
    else:
        out[:, :num_first] = _renormalize(source, reference, dims=(1, 2, 3, 4))
    return out
