"""The HunyuanVideo 3D causal VAE that Kandinsky 5 video models decode with (architecture reference section 6).

A thin wrapper over diffusers' `AutoencoderKLHunyuanVideo`: the DiT works channels-last ([B, T, H, W, 16]) and in
scaled latent units, the VAE channels-first and unscaled, and the video writer wants uint8 frames. Spatial tiling is
switched on (diffusers leaves it off) because an untiled decode materialises the mid-block attention mask over every
latent token of a window; temporal tiling is on in the library by default. parallel/vae_tiles.py deals the same tiles
to ranks, so both paths share `vae_input` and `frames_to_uint8` and give the same frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers is imported where a VAE is built: the rest of the engine runs without it
    from diffusers import AutoencoderKLHunyuanVideo

CLASS_NAME = "AutoencoderKLHunyuanVideo"

# enable_tiling() keyword names; None keeps the library default (256/192 px spatial, 16/12 frames temporal).
TILING_KEYS = (
    "tile_sample_min_height", "tile_sample_min_width", "tile_sample_min_num_frames",
    "tile_sample_stride_height", "tile_sample_stride_width", "tile_sample_stride_num_frames",
)


def vae_input(latents: torch.Tensor, vae: AutoencoderKLHunyuanVideo) -> torch.Tensor:
    """DiT latents [B, T, H, W, C] (scaled) -> the VAE's decoder input [B, C, T, H, W] (unscaled).

    Same order of operations as diffusers' Kandinsky 5 pipelines (cast, permute, divide), so a decode from here
    and theirs see bitwise-equal input.
    """
    if latents.ndim != 5 or latents.shape[-1] != vae.config.latent_channels:
        raise ValueError(
            f"expected channels-last latents [B, T, H, W, {vae.config.latent_channels}] as the DiT produces them, "
            f"got shape {tuple(latents.shape)}"
        )
    return latents.to(device=vae.device, dtype=vae.dtype).permute(0, 4, 1, 2, 3) / vae.config.scaling_factor


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [B, 3, F, H, W] in [-1, 1] -> uint8 frames [B, F, H, W, 3].

    Computed in fp32 and rounded (as diffusers' postprocessing does); the original repo truncates with
    `.to(torch.uint8)` in bf16, which differs by at most one level.
    """
    x = (video.float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return x.round_().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


def _vae_folder(folder: str | Path) -> Path:
    """The folder holding the VAE's config.json: the folder itself or its `vae/` subfolder (pipeline layout)."""
    folder = Path(folder)
    for candidate in (folder, folder / "vae"):
        config = candidate / "config.json"
        if not config.is_file():
            continue
        class_name = json.loads(config.read_text()).get("_class_name")
        if class_name == CLASS_NAME:
            return candidate
        if candidate == folder and (folder / "vae" / "config.json").is_file():
            continue  # a pipeline root with a model_index-like config.json: look in vae/
        raise ValueError(
            f"{config} describes a {class_name!r}, not a HunyuanVideo VAE ({CLASS_NAME!r}); Kandinsky 5 video "
            f"models decode with the VAE of hunyuanvideo-community/HunyuanVideo (its vae/ folder)"
        )
    raise FileNotFoundError(
        f"no VAE config.json in {folder} or {folder / 'vae'}; pass the HunyuanVideo VAE folder (the one with "
        f"config.json and diffusion_pytorch_model.safetensors) or a pipeline folder that has it as vae/"
    )



def vae_dtype(device: torch.device | str, image: bool = False) -> torch.dtype:
    """The VAE's compute dtype: half precision on a GPU, as the original runs them (fp16 for the HunyuanVideo VAE,
    bf16 for Image Lite's FLUX VAE); fp32 on the CPU, where half precision is slow and inexact. The memory estimate
    (parallel/memory.py) counts the VAE at this dtype's size."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if image else torch.float16


class VideoVAE:
    """Decodes DiT latents to uint8 frames and encodes images to latents with a tiled HunyuanVideo VAE."""

    def __init__(self, vae: AutoencoderKLHunyuanVideo, tiling: bool = True, **tiling_overrides: int | None):
        from diffusers import AutoencoderKLHunyuanVideo

        if not isinstance(vae, AutoencoderKLHunyuanVideo):
            raise TypeError(f"VideoVAE wraps an {CLASS_NAME}, got {type(vae).__name__}")
        unknown = set(tiling_overrides) - set(TILING_KEYS)
        if unknown:
            raise TypeError(f"unknown tiling options {sorted(unknown)}; known: {', '.join(TILING_KEYS)}")
        self.vae = vae.eval().requires_grad_(False)
        if tiling:
            vae.enable_tiling(**tiling_overrides)
        elif any(v is not None for v in tiling_overrides.values()):
            raise ValueError("tile sizes were given with tiling=False; drop them or enable tiling")

    @classmethod
    def from_pretrained(
        cls, folder_or_vae_subfolder: str | Path, torch_dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu", tiling: bool = True, **tiling_overrides: int | None,
    ) -> "VideoVAE":
        from diffusers import AutoencoderKLHunyuanVideo

        folder = _vae_folder(folder_or_vae_subfolder)
        vae = AutoencoderKLHunyuanVideo.from_pretrained(folder, torch_dtype=torch_dtype)
        return cls(vae.to(device), tiling=tiling, **tiling_overrides)

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def spatial_ratio(self) -> int:
        return self.vae.config.spatial_compression_ratio

    @property
    def temporal_ratio(self) -> int:
        return self.vae.config.temporal_compression_ratio

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, T, H, W, 16] -> uint8 frames [B, 4(T-1)+1, 8H, 8W, 3] (on the VAE's device)."""
        return frames_to_uint8(self.vae.decode(vae_input(latents, self.vae)).sample)
