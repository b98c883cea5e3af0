"""Text/image to video on one device: text encoders -> DiT sampling -> VAE decode.

A request is validated against the checkpoint's config before any weight is loaded, so bad input fails in a second
with one message. Parallel runs use the same pipeline: k5.parallel applies itself to ``pipeline.dit`` and replaces
the decode, and the launch script decides which rank writes what.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import locate
from .compile import sync
from .config import DiTConfig
from .dit import Kandinsky5DiT
from .memory import OFFLOAD_MODES, PEAKS
from .sampler import DEFAULT_SHIFT, Conditioning, initial_noise, sample, uses_cfg
from .text import DEFAULT_NEGATIVE_PROMPT, TextEncoder
from .vae import VideoVAE

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
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
    image: str | None = None  # I2V conditioning image

    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8, LATENT_CHANNELS)


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
    if req.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {req.guidance_scale}")
    if req.shift is not None and req.shift <= 0:
        raise ValueError(f"shift must be > 0, got {req.shift}")
    if req.image is not None:
        if not cfg.visual_cond:
            raise ValueError("this checkpoint has no visual_cond input, so it cannot condition on an image")
        if not Path(req.image).is_file():
            raise ValueError(f"image {req.image} is not a readable file")
    T, H, W = (req.num_frames - 1) // 4 + 1, req.height // 16, req.width // 16
    if max(T, H, W) > 128:
        warnings.warn(f"latent grid {T}x{H}x{W} exceeds the 128 positions per axis the model was trained with")


def check_components(root: Path) -> None:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"checkpoint {root} is not a folder; pass a Kandinsky 5 diffusers-format folder or 'tiny'")
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise ValueError(
            f"{root} is not a complete Kandinsky 5 checkpoint: missing component folder(s) {', '.join(missing)} "
            f"(expected {', '.join(COMPONENTS)} as in the diffusers layout)"
        )


def scheduler_shift(root: Path) -> float:
    path = Path(root) / "scheduler" / "scheduler_config.json"
    try:
        return float(json.loads(path.read_text()).get("shift", DEFAULT_SHIFT))
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return DEFAULT_SHIFT


def rope_scale(height: int, width: int) -> tuple[float, float, float]:
    # The original picks the RoPE scale by resolution bucket: (1,2,2) for the 512 bucket, (1,3.16,3.16) for the
    # 1024 bucket. Every 512-bucket size has sides <= 768 and every 1024-bucket size a side >= 1024, which is also
    # diffusers' 854-pixel rule on the released resolutions.
    return (1.0, 2.0, 2.0) if max(height, width) <= 854 else (1.0, 3.16, 3.16)


@dataclass
class Result:
    latents: Tensor  # [1, T, H, W, 16] fp32
    timings: dict = field(default_factory=dict)
    truncated: bool = False


class Kandinsky5Pipeline:
    """Text encoders -> DiT sampling -> VAE decode on ``device``.

    Where the weights live between uses (``offload``): "none" keeps every component on the device; "text" moves
    the text encoders off it once the prompts are encoded (``text_after_encode``: "cpu" keeps them in host memory
    for the next item, "release" frees them: a single video never needs them again); "model" keeps every
    component in host memory and moves each to the device only while it runs (text encoders, then the DiT, then
    the VAE), so a model whose parts fit the device one at a time runs on it.
    """

    def __init__(self, root: Path, dit: Kandinsky5DiT, text: TextEncoder | None, vae: VideoVAE, device,
                 offload: str = "none"):
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
        self.root, self.dit, self.text, self.vae = Path(root), dit, text, vae
        self.device = torch.device(device)
        self.offload = offload
        self.text_after_encode = "keep" if offload == "none" else "cpu"
        self.default_shift = scheduler_shift(root)
        # share_image(encode) -> latent: how ranks that work on one item get the I2V image latent. Here: encode.
        # Parallel runs encode on one rank and broadcast (k5.parallel.cfg.setup_parallel sets it).
        self.share_image = lambda encode: encode()
        PEAKS.resident = self.resident

    def resident(self) -> list[str]:
        """The components whose weights are on the compute device now (for the memory summary)."""
        def on_device(module) -> bool:
            p = next(module.parameters(), None) if module is not None else None
            return p is not None and p.device == self.device

        text = self.text if isinstance(self.text, TextEncoder) else None
        parts = {"DiT": self.dit, "text encoders": text.qwen if text else None, "VAE": self.vae.vae}
        return [name for name, m in parts.items() if on_device(m)]

    def _place(self, component: str, device) -> None:
        """Move one component (dit, text, vae) to ``device`` when offloading says it lives elsewhere."""
        if component == "dit":
            self.dit.to(device)
        elif component == "vae":
            self.vae.vae.to(device)
        elif isinstance(self.text, TextEncoder) and self.text.qwen is not None:
            self.text.to(device)

    @staticmethod
    def read_config(root: str | Path) -> DiTConfig:
        """The DiT config alone (no weights), to validate requests before loading."""
        check_components(Path(root))
        return locate(root).config

    @classmethod
    def from_pretrained(cls, root: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu",
                        dit: Kandinsky5DiT | None = None, text=None, offload: str = "none") -> "Kandinsky5Pipeline":
        """Load every component; a ``dit`` or ``text`` encoder given by the caller (a tensor-parallel DiT, text
        embeddings shared between ranks) is used instead of loading that component."""
        root = Path(root)
        check_components(root)
        device = torch.device(device)
        # --offload model: everything is loaded into host memory and visits the device only while it runs.
        home = torch.device("cpu") if offload == "model" else device
        dit = dit or Kandinsky5DiT.from_pretrained(root, torch_dtype=dtype, device=home)
        text = text or TextEncoder.from_pretrained(root, torch_dtype=dtype, device=home)
        # fp16 VAE on GPU as the original; fp32 on CPU, where half precision is slow and inexact.
        vae_dtype = torch.float16 if device.type == "cuda" else torch.float32
        vae = VideoVAE.from_pretrained(root, torch_dtype=vae_dtype, device=home)
        return cls(root, dit, text, vae, device, offload=offload)

    def encode(self, prompts: list[str]) -> tuple[list[Conditioning], list[bool]]:
        moves = self.offload == "model" and isinstance(self.text, TextEncoder)
        if moves or (isinstance(self.text, TextEncoder) and self.text_after_encode == "cpu"):
            self._place("text", self.device)
        e = self.text.encode(prompts)
        if isinstance(self.text, TextEncoder) and self.text_after_encode != "keep":
            # The embeddings are all the rest of the item needs: the encoders leave the device now.
            self.text.release() if self.text_after_encode == "release" else self._place("text", "cpu")
        conds = []
        for i in range(len(prompts)):
            # Decided here, once per item (one host read), so that no DiT forward has to sync to find out that a
            # prompt filling the whole text budget needs no key mask (the unmasked kernels are faster).
            mask = None if bool(e.mask[i].all()) else e.mask[i : i + 1]
            conds.append(Conditioning(e.embeds[i : i + 1], mask, e.pooled[i : i + 1]))
        return conds, e.truncated

    def velocity(self, inp: Tensor, t: Tensor, c: Conditioning, scale_factor) -> Tensor:
        return self.dit(inp, c.embeds, c.pooled, t, scale_factor=scale_factor, text_mask=c.mask)

    def first_frame(self, req: Request) -> Tensor | None:
        if req.image is None:
            return None
        from .i2v import encode_image, load_image, prepare_image

        def encode():
            img = prepare_image(load_image(req.image), req.height, req.width)
            g = torch.Generator("cpu").manual_seed(req.seed)
            if self.offload == "model":
                self._place("vae", self.device)
            try:
                return encode_image(self.vae, img, generator=g).float().to(self.device)
            finally:
                if self.offload == "model":
                    self._place("vae", "cpu")

        return self.share_image(encode)

    @torch.inference_mode()
    def generate(self, req: Request, on_step=None, guided=None) -> Result:
        # Clocks are read after a device sync: CUDA queues work, so an unsynchronised clock measures the queueing.
        sync(self.device)
        t0 = time.perf_counter()
        with PEAKS.phase("text", self.device):
            prompts = [req.prompt] + ([req.negative_prompt] if uses_cfg(req.guidance_scale) else [])
            conds, truncated = self.encode(prompts)
            cond, uncond = conds[0], (conds[1] if len(conds) > 1 else None)
            first = self.first_frame(req)
            sync(self.device)
        t1 = time.perf_counter()
        with PEAKS.phase("denoise", self.device):
            if self.offload == "model":
                self._place("dit", self.device)
            noise = initial_noise(req.latent_shape(), req.seed, self.device)
            sf = rope_scale(req.height, req.width)
            latents = sample(
                lambda inp, t, c: self.velocity(inp, t, c, sf), noise, cond, uncond, steps=req.steps,
                guidance_scale=req.guidance_scale, shift=req.shift or self.default_shift,
                visual_cond=self.dit.config.visual_cond, first_frame=first, on_step=on_step, guided=guided,
            )
            if first is not None:
                from .i2v import normalize_first_frame

                latents = normalize_first_frame(latents, per_frame=True)  # the original repo: per frame
            sync(self.device)
        t2 = time.perf_counter()
        if self.offload == "model":
            self._place("dit", "cpu")
        return Result(latents, {"text_s": t1 - t0, "denoise_s": t2 - t1, "step_s": (t2 - t1) / req.steps},
                      truncated=truncated[0])

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """uint8 frames [F, H, W, 3]."""
        with PEAKS.phase("decode", self.device):
            if self.offload == "model":
                self._place("vae", self.device)
            frames = self.vae.decode(latents)[0]
            sync(self.device)
        if self.offload == "model":
            self._place("vae", "cpu")
        return frames
