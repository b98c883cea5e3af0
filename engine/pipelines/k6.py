"""Kandinsky 6 text/image to video with audio on one device: text -> one DiT sampling both streams -> video VAE and
audio decode.

The sibling of engine/pipelines/video.py, on the same parts: the Kandinsky 5 text encoders with Kandinsky 6's
1024-token budget (engine/encoders/k6_text.py), the HunyuanVideo VAE (its decode is replaced by the per-rank tiled
decode in parallel runs, exactly as for Kandinsky 5), the video request (engine.pipelines.video.Request), and the
parts the parallel layouts pass in (``sharing``: the image latent encoded on one rank; the text encoder may be a
SharedText / BranchText; a guiding stage in ``chain``).
What is Kandinsky 6's own: the audio latent sampled with the video (engine/sampling/k6_sampler.py), the schedule of
the checkpoint (Euler for sft, PiFlow for distilled ones: engine/sampling/k6_schedule.py), I2AV's image as a masked
tail frame, and the audio decode (MMAudio VAE + vocoder, engine/vae/audio.py), which runs on one rank.

Noise and image, as diffusers' Kandinsky6TI2VAPipeline draws them from ``generator=torch.Generator().manual_seed(seed)``:
one CPU generator gives the video noise, then the audio noise (so a T2AV run equals diffusers' with that generator).
The I2AV image's posterior sample has a generator of its own (seeded with the seed): the image is encoded on one
rank of a parallel run and broadcast, and every rank must still draw the same noise.

``audio=False`` (``--no-audio``) samples the video alone, as diffusers' ``sample_audio=False``: the DiT's audio stream
is not run, so the video is not the one a run with audio gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from k5.engine.checkpoints.dit import load_k6_dit, locate, open_checkpoint
from k5.engine.checkpoints.files import Checkpoint, check_components
from k5.engine.checkpoints.state_dict import K6
from k5.engine.compile import sync
from k5.engine.encoders import k6_text
from k5.engine.encoders.text import TextEncoder
from k5.engine.memory import PEAKS
from k5.engine.model.k6_config import CLASS_NAME, K6Config
from k5.engine.model.k6_dit import Kandinsky6DiT
from k5.engine.pipelines.video import Request, Sharing, check_request as check_video_request
from k5.engine.sampling.chain import uses_cfg
from k5.engine.sampling.k6_sampler import audio_length, guided_forward, sample
from k5.engine.sampling.k6_schedule import EulerSchedule, PiFlowSchedule, Schedule, flow_sigmas, \
    schedule_from_config
from k5.engine.vae.audio import COMPONENTS as AUDIO_COMPONENTS, AudioDecoder, fit_to_video
from k5.engine.vae.video import VideoVAE, vae_dtype

FPS = 24
PIPELINE_CLASS = "Kandinsky6TI2VAPipeline"


def is_k6_checkpoint(root: str | Path) -> bool:
    """Whether a diffusers-layout folder holds a Kandinsky 6 video+audio pipeline (its transformer's class)."""
    import json

    try:
        config = json.loads((Path(root) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == CLASS_NAME


def has_audio(root: str | Path) -> bool:
    return all((Path(root) / name / "config.json").is_file() for name in AUDIO_COMPONENTS)


def audio_constants(root: str | Path) -> tuple[int, int]:
    """(sample rate, waveform samples per audio latent) from audio_vae/config.json, without loading it (the ranks
    that do not decode the audio still sample its latent). The VAE halves the mel frames once: 2 x hop_length."""
    import json

    config = json.loads((Path(root) / "audio_vae" / "config.json").read_text())
    return int(config.get("sample_rate", 44_100)), 2 * int(config.get("hop_length", 512))


def open_k6_checkpoint(source) -> Checkpoint:
    """The checked Checkpoint of a Kandinsky 6 folder (or what resolve_model returned, or a Checkpoint)."""
    if isinstance(source, (str, Path)):
        check_components(source)
        return Checkpoint.open(source, locate(source, K6))
    return open_checkpoint(source)


def check_request(req: Request, cfg: K6Config, nabla: bool) -> None:
    """Raise ValueError naming what is wrong with a Kandinsky 6 request: the video rules (sizes, frames, steps,
    guidance) and, for I2AV, an image the checkpoint can take and Pillow can read."""
    check_video_request(replace(req, image=None), cfg, nabla)
    if req.image is None:
        return
    if not cfg.supports_image:
        raise ValueError("this Kandinsky 6 checkpoint has no image input (visual_cond and two token types), so it "
                         "cannot condition on an image; drop --image")
    if not Path(req.image).is_file():
        raise ValueError(f"image {req.image} is not a readable file")
    try:
        from PIL import Image

        with Image.open(req.image) as im:
            im.verify()
    except (OSError, ValueError) as e:
        raise ValueError(f"image {req.image} is not an image file Pillow can read ({e})") from None


def check_schedule(root: str | Path, guidance_scale: float) -> None:
    """A PiFlow-distilled checkpoint samples without guidance: refuse a guidance scale before any weight loads."""
    if isinstance(schedule_from_config(root, 1), PiFlowSchedule) and uses_cfg(guidance_scale):
        raise ValueError(f"this checkpoint is PiFlow-distilled and samples without guidance; got --guidance-scale "
                         f"{guidance_scale:g}: use --guidance-scale 1")


def make_schedule(root: str | Path, steps: int, shift: float | None = None) -> Schedule:
    """The checkpoint's schedule at ``steps``; ``shift`` (a request's) replaces the config's."""
    schedule = schedule_from_config(root, steps)
    if shift is None:
        return schedule
    if isinstance(schedule, PiFlowSchedule):
        return replace(schedule, shift=shift)
    return EulerSchedule(flow_sigmas(steps, shift, schedule.num_train_timesteps), schedule.num_train_timesteps)


def av_noise(video_shape, audio_shape, seed: int, device) -> tuple[Tensor, Tensor | None]:
    """Video noise then audio noise from one CPU generator (diffusers' order), fp32 on ``device``."""
    g = torch.Generator("cpu").manual_seed(seed)
    video = torch.randn(video_shape, generator=g, dtype=torch.float32)
    audio = torch.randn(audio_shape, generator=g, dtype=torch.float32) if audio_shape is not None else None
    return video.to(device), (audio.to(device) if audio is not None else None)


def image_latent(vae: VideoVAE, path: str, height: int, width: int, seed: int) -> Tensor:
    """The I2AV image as diffusers' pipeline prepares it (resized to cover height x width, centre-cropped, [-1, 1]:
    its VideoProcessor, so the pixels are the reference's) -> the VAE posterior sample, scaled, [1, H/8, W/8, 16]."""
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    from k5.engine.sampling.i2v import encode_image

    with Image.open(path) as im:
        pixels = VideoProcessor(vae_scale_factor=8).preprocess(im.convert("RGB"), height=height, width=width,
                                                                resize_mode="crop")
    g = torch.Generator("cpu").manual_seed(seed)
    return encode_image(vae, pixels.float(), generator=g)[:, 0].float()


@dataclass
class AVResult:
    latents: Tensor  # video [1, T, H, W, 16] fp32
    audio: Tensor | None  # audio [1, La, C] fp32, None without audio
    timings: dict = field(default_factory=dict)
    truncated: bool = False
    forwards: dict | None = None  # as engine.pipelines.base.Result's
    frames: Tensor | None = None  # uint8 [F, H, W, 3], decoded by the engine on the group's leader
    step_ends: list = field(default_factory=list)  # the engine's clock at the end of each step


class Kandinsky6Pipeline:
    """Text encoders -> the Kandinsky 6 DiT over video and audio -> VAE decode and audio decode, on ``device``."""

    def __init__(self, checkpoint: Checkpoint, dit: Kandinsky6DiT, text, vae: VideoVAE, audio: AudioDecoder | None,
                 device, fps: int = FPS, sample_audio: bool = True, *, sharing: Sharing = Sharing()):
        self.checkpoint, self.dit, self.text, self.vae, self.audio = checkpoint, dit, text, vae, audio
        self.root = checkpoint.root
        self.sample_audio = sample_audio
        self.device = torch.device(device)
        self.fps = fps
        # How the ranks of an item share the I2AV image latent (k5.parallel.plan builds it: one rank encodes)
        self.sharing = sharing
        PEAKS.resident = self.resident

    def resident(self) -> list[str]:
        def on_device(module) -> bool:
            p = next(module.parameters(), None) if module is not None else None
            return p is not None and p.device == self.device

        text = self.text.qwen if isinstance(self.text, TextEncoder) else None
        parts = {"DiT": self.dit, "text encoders": text, "VAE": self.vae.vae,
                 "audio decoder": self.audio.vae if self.audio is not None else None}
        return [name for name, m in parts.items() if on_device(m)]

    @classmethod
    def from_pretrained(cls, source, dtype: torch.dtype = torch.bfloat16, device="cpu", dit=None, text=None,
                        audio: bool = True, config: K6Config | None = None,
                        audio_decoder: bool | None = None, sharing: Sharing = Sharing()) -> "Kandinsky6Pipeline":
        """Every component of ``source`` (a Kandinsky 6 diffusers folder, a resolve_model result or a Checkpoint); a
        ``dit`` or ``text`` encoder given by the caller (tensor-parallel DiT, shared text) is used instead.
        ``audio``: sample the audio stream; ``audio_decoder``: load the MMAudio VAE and vocoder (default: with
        audio; a parallel rank that writes no file passes False)."""
        checkpoint = open_k6_checkpoint(source)
        device = torch.device(device)
        dit = dit or load_k6_dit(checkpoint.dit, dtype, device, config=config)
        text = text or TextEncoder.from_pretrained(checkpoint.root, torch_dtype=dtype, device=device)
        vae = VideoVAE.from_pretrained(checkpoint.root, torch_dtype=vae_dtype(device), device=device)
        decoder = None
        if audio and (audio_decoder is None or audio_decoder):
            decoder = AudioDecoder.from_pretrained(checkpoint.root, device=device)
        return cls(checkpoint, dit, text, vae, decoder, device, sample_audio=audio, sharing=sharing)

    def encode(self, prompts: list[str]):
        if isinstance(self.text, TextEncoder) and self.text.qwen is not None:
            self.text.to(self.device)
        return k6_text.encode(self.text, prompts)

    def first_frame(self, req: Request) -> Tensor | None:
        if req.image is None:
            return None
        return self.sharing.image(
            lambda: image_latent(self.vae, req.image, req.height, req.width, req.seed).to(self.device))

    def audio_shape(self, req: Request) -> tuple[int, int, int] | None:
        if not self.sample_audio:
            return None
        rate, hop = audio_constants(self.root)
        return (1, audio_length(req.num_frames, self.fps, rate, hop), self.dit.config.in_audio_dim)

    @torch.inference_mode()
    def generate(self, req: Request, on_step=None, prompt: str | None = None, chain=()) -> AVResult:
        """Sample one request: the final video latents and (with audio) audio latents. ``chain``: at most one stage,
        the one that makes a step's guided predictions (k5.parallel.k6.CfgParallel: the CFG exchange; default both
        branches here, engine.sampling.k6_sampler.guided_forward). MagCache has no Kandinsky 6 calibration."""
        if len(chain) > 1:
            raise ValueError(f"a Kandinsky 6 step takes one guiding stage (CFG parallel), got {len(chain)} stages")
        guided = chain[0] if chain else guided_forward
        sync(self.device)
        t0 = time.perf_counter()
        with PEAKS.phase("text", self.device):
            prompts = [req.prompt if prompt is None else prompt]
            prompts += [req.negative_prompt] if uses_cfg(req.guidance_scale) else []
            conds, truncated = self.encode(prompts)
            cond, uncond = conds[0], (conds[1] if len(conds) > 1 else None)
            first = self.first_frame(req)
            sync(self.device)
        t1 = time.perf_counter()
        with PEAKS.phase("denoise", self.device):
            video, audio = av_noise(req.latent_shape(), self.audio_shape(req), req.seed, self.device)
            schedule = make_schedule(self.root, req.steps, req.shift)
            latents, audio = sample(self.dit, video, audio, cond, uncond, schedule,
                                    guidance_scale=req.guidance_scale, patch_size=self.dit.config.patch_size,
                                    visual_cond=self.dit.config.visual_cond, first_frame=first, on_step=on_step,
                                    guided=guided)
            sync(self.device)
        t2 = time.perf_counter()
        return AVResult(latents, audio, {"text_s": t1 - t0, "denoise_s": t2 - t1, "step_s": (t2 - t1) / req.steps},
                        truncated=truncated[0])

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """uint8 frames [F, H, W, 3] (one process; parallel runs split it by tiles, k5.parallel.vae_tiles)."""
        with PEAKS.phase("decode", self.device):
            frames = self.vae.decode(latents)[0]
            sync(self.device)
        return frames

    @torch.inference_mode()
    def decode_audio(self, audio: Tensor, num_frames: int) -> Tensor:
        """Audio latents [1, La, C] -> the mono waveform fp32 [S], cut to the video's ``num_frames`` at ``fps``."""
        if self.audio is None:
            raise RuntimeError("the audio decoder is not loaded on this rank (it runs on the writing rank only)")
        with PEAKS.phase("decode", self.device):
            wave = self.audio.decode(audio)[0]
        return fit_to_video(wave, num_frames, self.fps, self.audio.sample_rate)
