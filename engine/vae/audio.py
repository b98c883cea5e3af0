"""Kandinsky 6 audio decode: MMAudio VAE latents -> log-mel spectrogram -> BigVGAN vocoder -> 44.1 kHz waveform.

A thin wrapper over diffusers' ``MMAudioVAE`` and ``MMAudioVocoder``, as engine/vae/video.py wraps the HunyuanVideo VAE,
rather than our own copy of them: the decode is a fixed stack of convolutions that runs once per video on one
rank, with nothing for the engine to split, fuse or reorder, so a second implementation would only be a second
place for the released weights' conventions (magnitude-preserving layers, anti-aliased Snake activations) to
drift. What is ours is the glue: the DiT's channels-last, scaled latents to the VAE's channels-first, unscaled
input, in the reference pipeline's order of operations, and the checks that the two models and the DiT agree.

The decode runs in fp32 by default whatever the DiT's dtype: it is small (a 5 s clip is 216 latents) and the
magnitude-preserving layers renormalise every activation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers is imported where the decoder is built
    from diffusers import MMAudioVAE, MMAudioVocoder

COMPONENTS = ("audio_vae", "vocoder")


class AudioDecoder:
    def __init__(self, vae: MMAudioVAE, vocoder: MMAudioVocoder):
        upsampling = 1
        for rate in vocoder.config.upsample_rates:
            upsampling *= rate
        if vocoder.config.num_mels != vae.config.mel_bins or upsampling != vae.config.hop_length:
            raise ValueError(
                f"the vocoder does not fit the audio VAE: it takes {vocoder.config.num_mels} mel bins and upsamples "
                f"x{upsampling}, the VAE decodes {vae.config.mel_bins} mel bins at hop {vae.config.hop_length}")
        self.vae = vae.eval().requires_grad_(False)
        self.vocoder = vocoder.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "AudioDecoder":
        """The pipeline folder's ``audio_vae/`` and ``vocoder/``."""
        from diffusers import MMAudioVAE, MMAudioVocoder

        folder = Path(folder)
        for name in COMPONENTS:
            if not (folder / name / "config.json").is_file():
                raise FileNotFoundError(
                    f"component '{name}' missing: expected {folder / name / 'config.json'} (a Kandinsky 6 "
                    f"checkpoint with audio has {' and '.join(COMPONENTS)}; or generate with --no-audio)")
        vae = MMAudioVAE.from_pretrained(folder / "audio_vae", torch_dtype=torch_dtype)
        vocoder = MMAudioVocoder.from_pretrained(folder / "vocoder", torch_dtype=torch_dtype)
        return cls(vae.to(device), vocoder.to(device))

    @property
    def sample_rate(self) -> int:
        return self.vae.config.sample_rate

    @property
    def latent_hop(self) -> int:
        """Waveform samples per audio latent (the VAE halves the mel frames once)."""
        return self.vae.latent_hop_length

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT audio latents [B, La, C] (scaled) -> mono waveform fp32 [B, La * latent_hop] in [-1, 1]."""
        if latents.ndim != 3 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"expected channels-last audio latents [B, La, {self.latent_channels}] as the DiT "
                             f"produces them, got shape {tuple(latents.shape)}")
        # permute, cast, divide: the reference pipeline's order, so both decodes see the same input
        z = latents.to(self.vae.device).permute(0, 2, 1).to(self.vae.dtype) / self.scaling_factor
        mel = self.vae.decode(z).sample
        return self.vocoder(mel.to(self.vocoder.dtype)).sample[:, 0].float()


def fit_to_video(waveform: torch.Tensor, num_frames: int, fps: float, sample_rate: int,
                 slack: int = 2048) -> torch.Tensor:
    """The waveform [..., S] cut to the video's duration, round(num_frames / fps * sample_rate) samples.

    The DiT's audio covers the video rounded up to whole latents (1024 samples), so it is at most that much longer;
    a waveform shorter than the video by more than ``slack`` samples did not come from the same generation."""
    want = round(num_frames / fps * sample_rate)
    have = waveform.shape[-1]
    if have < want - slack:
        raise ValueError(f"the audio is {have / sample_rate:.3f} s, the video {want / sample_rate:.3f} s "
                         f"({num_frames} frames at {fps} fps): they do not belong together")
    if have < want:
        return torch.nn.functional.pad(waveform, (0, want - have))
    return waveform[..., :want]
