"""Text/image to video on one device: text encoders -> DiT sampling -> VAE decode.

A request is validated against the checkpoint's config before any weight is loaded, so bad input fails in a second
with one message. Parallel runs use the same pipeline: k5.parallel applies itself to ``pipeline.dit`` and replaces
the decode, and the launch script decides which rank writes what.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from k5.engine.checkpoints.dit import load_dit, open_checkpoint
from k5.engine.checkpoints.files import Checkpoint
from k5.engine.compile import sync
from k5.engine.model.config import DiTConfig
from k5.engine.model.dit import Kandinsky5DiT
from k5.engine.memory import OFFLOAD_MODES, PEAKS
from k5.engine.sampling.sampler import DEFAULT_SHIFT, Conditioning, initial_noise, sample, uses_cfg
from k5.engine.encoders.text import DEFAULT_NEGATIVE_PROMPT, TextEncoder
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


def scheduler_shift(root: Path, default: float = DEFAULT_SHIFT) -> float:
    path = Path(root) / "scheduler" / "scheduler_config.json"
    try:
        return float(json.loads(path.read_text()).get("shift", default))
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return default


def rope_scale(height: int, width: int) -> tuple[float, float, float]:
    # The original's RoPE scale by resolution bucket (its configs' scale_factor): (1,2,2) at 512, (1,3.16,3.16) at
    # 1024. For I2V the bucket is the one of the requested area, as the original's comes from its config.
    return (1.0, 3.16, 3.16) if hd_bucket(height, width) else (1.0, 2.0, 2.0)


def make_expander(encoder: TextEncoder | None):
    """``expander(prompt, task, seed, image=None) -> str`` on the encoder's Qwen2.5-VL (``image``: a path, for i2v and
    i2i); without an encoder (a rank that is not a text source) one that refuses, since share_text never calls it
    there."""

    def expander(prompt: str, task: str, seed: int, image: str | None = None) -> str:
        from k5.engine.encoders.expand import IMAGE_TASKS, expand_prompt, expand_prompt_with_image

        if encoder is None:
            raise RuntimeError("this rank holds no text encoder; prompt expansion runs on the item group's rank 0")
        if task not in IMAGE_TASKS:
            return expand_prompt(encoder, prompt, task, seed)
        if image is None:
            raise ValueError(f"prompt expansion for {task} needs the image")
        from k5.engine.media.image import open_image

        # The image as displayed (EXIF orientation applied), as the DiT is conditioned on it.
        return expand_prompt_with_image(encoder, prompt, open_image(image), task, seed)

    return expander


def expand_or_reuse(expand, reuse=None) -> str:
    """``reuse()``'s text when it has one (a recorded expansion), else ``expand()``."""
    text = reuse() if reuse is not None else None
    return expand() if text is None else text


@dataclass
class Result:
    latents: Tensor  # [1, T, H, W, 16] fp32
    timings: dict = field(default_factory=dict)
    truncated: bool = False
    forwards: dict | None = None  # DiT forwards {"run": N, "skipped": [[step, branch], ...]}, where the caller knows
    frames: Tensor | None = None  # uint8 [F, H, W, 3], decoded by the engine (k5.launch.engine) on the group's leader
    step_ends: list = field(default_factory=list)  # perf_counter() at the end of each denoising step (the engine's)


def _here(run):
    return run()


@dataclass(frozen=True)
class Sharing:
    """How the ranks that work on one item share what one of them computes, built by k5.parallel.plan for a layout
    and passed to the pipeline: ``image(encode) -> latent`` (the I2V first frame's or an edit's source latent: one
    rank encodes, the others receive it) and ``text(expand) -> str`` (a prompt expansion, run on the item group's
    rank 0 and shared). The default, one process: each runs its function here."""

    image: Callable = _here
    text: Callable = _here


class Kandinsky5Pipeline:
    """Text encoders -> DiT sampling -> VAE decode on ``device``.

    Where the weights live between uses (``offload``): "none" keeps every component on the device; "text" moves
    the text encoders off it once the prompts are encoded (``text_after_encode``: "cpu" keeps them in host memory
    for the next item, "release" frees them: a single video never needs them again); "model" keeps every
    component in host memory and moves each to the device only while it runs (text encoders, then the DiT, then
    the VAE), so a model whose parts fit the device one at a time runs on it.
    """

    def __init__(self, checkpoint: Checkpoint | str | Path, dit: Kandinsky5DiT, text: TextEncoder | None,
                 vae: VideoVAE, device, offload: str = "none", *, sharing: Sharing = Sharing(), expander=None):
        """``checkpoint``: the checked Checkpoint the components came from (a folder is enough for a pipeline built
        from components at hand: it then only supplies the scheduler config). ``sharing``: how the ranks of an item
        share (k5.parallel.plan's; default one process). ``expander(prompt, task, seed, image) -> text``: the
        reference's prompt expansion (``make_expander``; None: not loaded)."""
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else None
        self.dit, self.text, self.vae = dit, text, vae
        self.root = root = checkpoint.root if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
        self.device = torch.device(device)
        self.offload = offload
        self.text_after_encode = "keep" if offload == "none" else "cpu"
        self.default_shift = scheduler_shift(root)
        self.sharing, self.expander = sharing, expander
        PEAKS.resident = self.resident

    def resident(self) -> list[str]:
        """The components whose weights are on the compute device now (for the memory summary)."""
        def on_device(module) -> bool:
            p = next(module.parameters(), None) if module is not None else None
            return p is not None and p.device == self.device

        text = self.text if isinstance(self.text, TextEncoder) else None
        parts = {"DiT": self.dit, "text encoders": text.qwen if text else None, "VAE": self.vae.vae}
        return [name for name, m in parts.items() if on_device(m)]

    @contextlib.contextmanager
    def on_device(self, component: str):
        """``component`` (dit, vae) on the compute device for the block: with --offload model it waits in host memory
        and visits the device only while it runs; otherwise it is there already."""
        if self.offload != "model":
            yield
            return
        self._place(component, self.device)
        try:
            yield
        finally:
            self._place(component, "cpu")

    def _place(self, component: str, device) -> None:
        """Move one component (dit, text, vae) to ``device`` when offloading says it lives elsewhere."""
        if component == "dit":
            self.dit.to(device)
        elif component == "vae":
            self.vae.vae.to(device)
        elif isinstance(self.text, TextEncoder) and self.text.qwen is not None:
            self.text.to(device)

    @classmethod
    def from_pretrained(cls, source, dtype: torch.dtype = torch.bfloat16, device="cpu",
                        dit: Kandinsky5DiT | None = None, text=None, expand: bool = False, adapters=(),
                        offload: str = "none", *, config: DiTConfig | None = None, sharing: Sharing = Sharing(),
                        expander=None) -> "Kandinsky5Pipeline":
        """Load every component of ``source`` (a diffusers-layout folder, what ``resolve_model`` returned, or a
        checked engine.checkpoints.files.Checkpoint); a ``dit`` or ``text`` encoder given by the caller (a
        tensor-parallel DiT, text embeddings shared between ranks) is used instead of loading that component.
        ``expand``: also load the Qwen2.5-VL lm_head for prompt expansion (``expand_prompt``); ``adapters``: LoRAs
        merged into the DiT; ``config``: the DiT config to build (a catalogue variant's attention on a file that
        carries none; ``from_resolved`` passes it); ``sharing``, ``expander``: as the constructor's (default with
        ``expand``: the loaded encoder's expansion)."""
        checkpoint = open_checkpoint(source)
        device = torch.device(device)
        # --offload model: everything is loaded into host memory and visits the device only while it runs.
        home = torch.device("cpu") if offload == "model" else device
        dit = dit or load_dit(checkpoint.dit, dtype, home, config=config, adapters=adapters)
        text = text or TextEncoder.from_pretrained(checkpoint.root, torch_dtype=dtype, device=home, lm_head=expand)
        vae = VideoVAE.from_pretrained(checkpoint.root, torch_dtype=vae_dtype(device), device=home)
        if expand and expander is None and isinstance(text, TextEncoder):
            expander = make_expander(text)
        return cls(checkpoint, dit, text, vae, device, offload=offload, sharing=sharing, expander=expander)

    def expand_prompt(self, req: Request, task: str | None = None, reuse=None) -> str:
        """The reference's expansion of ``req.prompt`` (seeded with ``req.seed``), computed once per item (on the item
        group's rank 0 in parallel runs) and returned on every rank. ``task``: t2v / i2v / t2i (default: i2v with an
        image, else t2v). ``reuse() -> str | None`` is asked first, where the expansion runs: a text it returns (the
        expansion a resumed job recorded) is shared instead of generating one. The caller encodes the result:
        ``generate(req, prompt=expanded)``."""
        if self.expander is None:
            raise RuntimeError("prompt expansion is not loaded: build the pipeline with expand=True")
        task = task or ("i2v" if req.image else "t2v")

        def expand():
            if isinstance(self.text, TextEncoder) and self.text.qwen is not None and self.offload != "none":
                self._place("text", self.device)  # encode() moves it off again right after the embedding
            return self.expander(req.prompt, task, req.seed, req.image)

        return self.sharing.text(lambda: expand_or_reuse(expand, reuse))

    @classmethod
    def from_resolved(cls, resolved, dtype: torch.dtype = torch.bfloat16, device="cpu", **kwargs) -> "Kandinsky5Pipeline":
        """Load what ``k5.engine.catalogue.resolve.resolve_model`` found: components from its root, the DiT from its file or
        folder with its config (the variant's attention applied). ``kwargs``: expand, adapters."""
        return cls.from_pretrained(resolved, dtype, device, config=resolved.config, **kwargs)

    def encode(self, prompts: list[str], **text_kwargs) -> tuple[list[Conditioning], list[bool]]:
        """``text_kwargs``: the encoder's (an image prompt format and its images: ImagePipeline)."""
        moves = self.offload == "model" and isinstance(self.text, TextEncoder)
        if moves or (isinstance(self.text, TextEncoder) and self.text_after_encode == "cpu"):
            self._place("text", self.device)
        e = self.text.encode(prompts, **text_kwargs)
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

    @torch.inference_mode()
    def generate(self, req: Request, on_step=None, chain=(), prompt: str | None = None) -> Result:
        """Sample one request. ``chain``: stages of the step chain (k5.engine.sampling.chain: CfgParallel, MagCache, ...);
        ``prompt``: the text to encode instead of
        ``req.prompt`` (its expansion, see ``expand_prompt``)."""
        # Clocks are read after a device sync: CUDA queues work, so an unsynchronised clock measures the queueing.
        sync(self.device)
        t0 = time.perf_counter()
        with PEAKS.phase("text", self.device):
            prompts = [req.prompt if prompt is None else prompt]
            prompts += [req.negative_prompt] if uses_cfg(req.guidance_scale) else []
            conds, truncated = self.encode(prompts)
            cond, uncond = conds[0], (conds[1] if len(conds) > 1 else None)
            size = frame_size(req, self.dit.nabla is not None)
            first = self.first_frame(req, size)
            sync(self.device)
        t1 = time.perf_counter()
        with self.on_device("dit"):
            with PEAKS.phase("denoise", self.device):
                noise = initial_noise(req.latent_shape(size), req.seed, self.device)
                sf = rope_scale(req.height, req.width)
                latents = sample(
                    lambda inp, t, c, **kw: self.velocity(inp, t, c, sf, **kw), noise, cond, uncond, steps=req.steps,
                    guidance_scale=req.guidance_scale, shift=req.shift or self.default_shift,
                    visual_cond=self.dit.config.visual_cond, first_frame=first, on_step=on_step, chain=chain,
                )
                if first is not None:
                    from k5.engine.sampling.i2v import normalize_first_frame

                    latents = normalize_first_frame(latents, per_frame=True)  # the original repo: per frame
                sync(self.device)
            t2 = time.perf_counter()
        return Result(latents, {"text_s": t1 - t0, "denoise_s": t2 - t1, "step_s": (t2 - t1) / req.steps},
                      truncated=truncated[0])

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """uint8 frames [F, H, W, 3]."""
        with self.on_device("vae"), PEAKS.phase("decode", self.device):
            frames = self.vae.decode(latents)[0]
            sync(self.device)
        return frames
