"""Kandinsky 6 sampling: the video and the audio latent denoised together, one DiT forward per branch and step.

Each step: the DiT predicts both streams from the current latents (with classifier-free guidance, the conditional and
the unconditional forwards are combined per stream: v_u + w (v_c - v_u)); then the schedule (engine/sampling/k6_schedule.py:
Euler for sft checkpoints, PiFlow for distilled ones) advances each latent with its own prediction.

Image to video+audio (I2AV), as the reference pipeline does it: the image latent is appended to the video as one
extra *tail* frame, with token type 1 (every other frame 0), RoPE time position 0 (the first frame's) and mask 1 in
the visual_cond channels; the conditioning-latent channels stay zero. The tail is reset to the image latent before
every forward (the schedule moves it like any frame in between) and dropped at the end.

The latents are kept in fp32 across steps (the DiT input is cast to its compute dtype inside the forward).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from k5.engine.sampling.chain import Conditioning, combine_cfg, uses_cfg
from k5.engine.sampling.k6_schedule import PiFlowSchedule, Schedule

# (x, audio, text embeds, pooled, t*1000, text_mask=, visual_rope_pos=, visual_token_type_ids=) -> (video, audio)
AVForward = Callable[..., tuple[Tensor, Tensor | None]]


def video_input(x: Tensor, visual_cond: bool, tail: bool) -> Tensor:
    """[x, zero conditioning latent, mask] along channels; the mask is 1 on the I2AV tail frame."""
    if not visual_cond:
        return x
    mask = torch.zeros_like(x[..., :1])
    if tail:
        mask[:, -1] = 1
    return torch.cat([x, torch.zeros_like(x), mask], -1)


def tail_frame_kwargs(B: int, T: int, H: int, W: int, patch_size, device) -> dict:
    """The DiT keyword arguments of an I2AV forward over T generated latent frames plus the tail frame."""
    pt, ph, pw = patch_size
    types = torch.zeros(B, T // pt + 1, dtype=torch.long, device=device)
    types[:, -1] = 1
    positions = (torch.cat([torch.arange(T // pt, device=device), torch.zeros(1, dtype=torch.long, device=device)]),
                 torch.arange(H // ph, device=device), torch.arange(W // pw, device=device))
    return dict(visual_rope_pos=positions, visual_token_type_ids=types)


def guided_forward(forward: AVForward, inp: Tensor, audio: Tensor | None, t: Tensor, cond: Conditioning,
                   uncond: Conditioning | None, guidance_scale: float, **kwargs) -> tuple[Tensor, Tensor | None]:
    """Both streams' predictions of one step, guided: the branches one after the other, as the reference."""

    def run(c: Conditioning):
        v, a = forward(inp, audio, c.embeds, c.pooled, t, text_mask=c.mask, **kwargs)
        return v.float(), (a.float() if a is not None else None)

    v, a = run(cond)
    if uncond is None or not uses_cfg(guidance_scale):
        return v, a
    vu, au = run(uncond)
    return combine_cfg(v, vu, guidance_scale), (combine_cfg(a, au, guidance_scale) if a is not None else None)


def sample(forward: AVForward, video_noise: Tensor, audio_noise: Tensor | None, cond: Conditioning,
           uncond: Conditioning | None, schedule: Schedule, *, guidance_scale: float, patch_size=(1, 2, 2),
           visual_cond: bool = True, first_frame: Tensor | None = None,
           on_step: Callable[[int], None] | None = None,
           guided: Callable[..., tuple[Tensor, Tensor | None]] = guided_forward) -> tuple[Tensor, Tensor | None]:
    """Integrate video noise [B,T,H,W,C] and audio noise [B,La,Ca] (None: video alone) to the final latents (fp32).

    ``first_frame`` [B,H,W,C]: the image latent of I2AV. ``guided`` replaces how one step's predictions are made
    from the forward (CFG parallel swaps it); it takes the arguments of ``guided_forward``.
    """
    if isinstance(schedule, PiFlowSchedule) and uncond is not None and uses_cfg(guidance_scale):
        raise ValueError(f"a PiFlow-distilled checkpoint samples without guidance; got guidance scale "
                         f"{guidance_scale}: use --guidance-scale 1")
    x = video_noise.float()
    audio = audio_noise.float() if audio_noise is not None else None
    B, T, H, W, _ = x.shape
    kwargs = {}
    if first_frame is not None:
        if first_frame.shape != (B, H, W, x.shape[-1]):
            raise ValueError(f"the image latent must be [B, H, W, C] = {(B, H, W, x.shape[-1])}, got "
                             f"{tuple(first_frame.shape)}")
        first_frame = first_frame.float()
        x = torch.cat([x, first_frame[:, None]], 1)
        kwargs = tail_frame_kwargs(B, T, H, W, patch_size, x.device)
    for i in range(schedule.steps):
        if first_frame is not None:
            x[:, -1] = first_frame
        t = schedule.timesteps[i].to(x.device).expand(B)
        v, a = guided(forward, video_input(x, visual_cond, first_frame is not None), audio, t, cond, uncond,
                      guidance_scale, **kwargs)
        x = schedule.step(i, v, x)
        if audio is not None:
            audio = schedule.step(i, a, audio)
        if on_step is not None:
            on_step(i)
    if first_frame is not None:
        x = x[:, :-1]
    return x, audio


def audio_length(num_frames: int, fps: float, sample_rate: int = 44_100, latent_hop: int = 1024,
                 temporal_ratio: int = 4) -> int:
    """Audio latent frames of a video of ``num_frames`` (4k+1) frames: its duration rounded up to whole latents
    (the reference pipeline's float expression, so that the lengths agree at every frame rate)."""
    latent_frames = (num_frames - 1) // temporal_ratio + 1
    return math.ceil(((latent_frames - 1) * temporal_ratio + 1) / fps * sample_rate / latent_hop)
