"""The FLUX.1-dev VAE that Kandinsky 5 Image Lite encodes source images and decodes latents with (section 1.1).

A thin wrapper over diffusers' 2D `AutoencoderKL` (16 latent channels, 8x), in the DiT's channels-last layout with
one latent frame ([B, 1, H/8, W/8, 16]). Scaling is `z * scaling_factor` only: the FLUX VAE config also carries a
`shift_factor` (0.1159) that FLUX itself subtracts, but Kandinsky's original code and diffusers' Kandinsky 5 image
pipelines both ignore it (encode_video: `latent_dist.sample() * scaling_factor`; decode: `/ scaling_factor`), and the
DiT was trained on those latents, so applying the shift would feed it inputs off its training distribution.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from k5.engine.checkpoints.files import IMAGE_VAE_CLASS

if TYPE_CHECKING:  # diffusers is imported where a VAE is built: the rest of the engine runs without it
    from diffusers import AutoencoderKL

LATENT_CHANNELS = 16


def _vae_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    for candidate in (folder / "vae", folder):
        config = candidate / "config.json"
        if config.is_file():
            name = json.loads(config.read_text()).get("_class_name")
            if name == IMAGE_VAE_CLASS:
                return candidate
            if candidate == folder / "vae":
                raise ValueError(
                    f"{config} describes a {name!r}, not the FLUX VAE ({IMAGE_VAE_CLASS!r}) of Kandinsky 5 Image Lite "
                    f"(a video checkpoint? its VAE is AutoencoderKLHunyuanVideo)"
                )
    raise FileNotFoundError(f"no VAE config.json in {folder / 'vae'} or {folder}; an Image Lite checkpoint has the "
                            f"FLUX.1-dev VAE (AutoencoderKL) as vae/")


class ImageVAE:
    def __init__(self, vae: "AutoencoderKL"):
        from diffusers import AutoencoderKL

        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"ImageVAE wraps an {IMAGE_VAE_CLASS}, got {type(vae).__name__}")
        if vae.config.latent_channels != LATENT_CHANNELS:
            raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels; Kandinsky 5 Image Lite uses "
                             f"the 16-channel FLUX VAE")
        self.vae = vae.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> "ImageVAE":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(_vae_folder(folder), torch_dtype=torch_dtype)
        return cls(vae.to(device))

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 1, H/8, W/8, 16] (fp32), a posterior sample as both
        references draw it (`generator` on the CPU: the same sample on every device)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"expected images [B, 3, H, W] with H and W multiples of 8, got shape {tuple(x.shape)}")
        z = self.vae.encode(x.to(self.device, self.dtype)).latent_dist.sample(generator=generator)
        return (z * self.scaling_factor).float().permute(0, 2, 3, 1)[:, None]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 1, h, w, 16] -> uint8 images [B, 8h, 8w, 3], rounded as diffusers' postprocessing does."""
        if latents.ndim != 5 or latents.shape[1] != 1 or latents.shape[-1] != LATENT_CHANNELS:
            raise ValueError(f"expected one-frame latents [B, 1, h, w, {LATENT_CHANNELS}], got shape "
                             f"{tuple(latents.shape)}")
        z = latents[:, 0].to(self.device, self.dtype).permute(0, 3, 1, 2) / self.scaling_factor
        x = self.vae.decode(z).sample
        return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
