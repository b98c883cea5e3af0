"""What the video and the image pipeline share: their components (the DiT, the text encoders, a VAE), where those
wait between uses (offload), how the ranks of one item share work (``Sharing``), prompt expansion, and the one
``generate`` skeleton: text phase (``prepare``: the family's conditioning), denoising through the step chain, the
result. engine/pipelines/video.py (T2V, I2V) and image.py (T2I, I2I) are the two siblings; each says only what its
family does differently.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from k5.engine.checkpoints.dit import load_dit, open_checkpoint
from k5.engine.checkpoints.files import Checkpoint
from k5.engine.compile import sync
from k5.engine.encoders.text import TextEncoder
from k5.engine.memory import OFFLOAD_MODES, PEAKS
from k5.engine.model.config import DiTConfig
from k5.engine.model.dit import Kandinsky5DiT
from k5.engine.sampling.sampler import DEFAULT_SHIFT, Conditioning, sample


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


@dataclass
class Prepared:
    """A request's conditioning, made in the text phase by the family's ``prepare``, for the denoising."""

    velocity: Callable  # (inp, t, cond, **dit_kwargs) -> the DiT's velocity
    noise: Callable[[], Tensor]  # the initial latent, drawn when the denoising starts
    cond: Conditioning
    uncond: Conditioning | None
    truncated: bool
    visual_cond: bool = False  # the sampler builds the DiT input with the image-conditioning channels
    first_frame: Tensor | None = None  # I2V: the image latent the first frame is held to
    finish: Callable[[Tensor], Tensor] = lambda latents: latents  # after the last step


def scheduler_shift(root: Path, default: float = DEFAULT_SHIFT) -> float:
    path = Path(root) / "scheduler" / "scheduler_config.json"
    try:
        return float(json.loads(path.read_text()).get("shift", default))
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return default


def make_expander(encoder: TextEncoder | None):
    """``expander(prompt, task, seed, image=None) -> str`` on the encoder's Qwen2.5-VL (``image``: a path, for i2v and
    i2i); without an encoder (a rank that is not a text source) one that refuses, since Sharing.text never calls it
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


class Pipeline:
    """Text encoders -> DiT sampling -> VAE decode on ``device``; the family's subclass says how a request is
    conditioned (``prepare``), which VAE it decodes with and what its result holds.

    Where the weights live between uses (``offload``): "none" keeps every component on the device; "text" moves
    the text encoders off it once the prompts are encoded (``text_after_encode``: "cpu" keeps them in host memory
    for the next item, "release" frees them: a single video never needs them again); "model" keeps every
    component in host memory and moves each to the device only while it runs (text encoders, then the DiT, then
    the VAE: ``on_device``), so a model whose parts fit the device one at a time runs on it.
    """

    DEFAULT_SHIFT = DEFAULT_SHIFT  # the family's, when the checkpoint's scheduler config has none

    def __init__(self, checkpoint: Checkpoint | str | Path, dit: Kandinsky5DiT, text: TextEncoder | None, vae, device,
                 offload: str = "none", *, sharing: Sharing = Sharing(), expander=None):
        """``checkpoint``: the checked Checkpoint the components came from (a folder is enough for a pipeline built
        from components at hand: it then only supplies the scheduler config). ``sharing``: how the ranks of an item
        share (k5.parallel.plan's; default one process). ``expander(prompt, task, seed, image) -> text``: the
        reference's prompt expansion (``make_expander``; None: not loaded)."""
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else None
        self.dit, self.text, self.vae = dit, text, vae
        self.root = checkpoint.root if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
        self.device = torch.device(device)
        self.offload = offload
        self.text_after_encode = "keep" if offload == "none" else "cpu"
        self.default_shift = scheduler_shift(self.root, self.DEFAULT_SHIFT)
        self.sharing, self.expander = sharing, expander
        PEAKS.resident = self.resident

    # ---- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def check_checkpoint(cls, checkpoint: Checkpoint, config: DiTConfig | None) -> None:
        """Raise ValueError for a checkpoint of another family (before any weight loads)."""

    @classmethod
    def load_vae(cls, root: Path, device: torch.device, home: torch.device):
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, source, dtype: torch.dtype = torch.bfloat16, device="cpu",
                        dit: Kandinsky5DiT | None = None, text=None, expand: bool = False, adapters=(),
                        offload: str = "none", *, config: DiTConfig | None = None, sharing: Sharing = Sharing(),
                        expander=None):
        """Load every component of ``source`` (a diffusers-layout folder, what ``resolve_model`` returned, or a
        checked engine.checkpoints.files.Checkpoint); a ``dit`` or ``text`` encoder given by the caller (a
        tensor-parallel DiT, text embeddings shared between ranks) is used instead of loading that component.
        ``expand``: also load the Qwen2.5-VL lm_head for prompt expansion (``expand_prompt``); ``adapters``: LoRAs
        merged into the DiT; ``config``: the DiT config to build (a catalogue variant's attention on a file that
        carries none; ``from_resolved`` passes it); ``sharing``, ``expander``: as the constructor's (default with
        ``expand``: the loaded encoder's expansion)."""
        checkpoint, device = open_checkpoint(source), torch.device(device)
        cls.check_checkpoint(checkpoint, config)
        # --offload model: everything is loaded into host memory and visits the device only while it runs.
        home = torch.device("cpu") if offload == "model" else device
        dit = dit or load_dit(checkpoint.dit, dtype, home, config=config, adapters=adapters)
        text = text or TextEncoder.from_pretrained(checkpoint.root, torch_dtype=dtype, device=home, lm_head=expand)
        vae = cls.load_vae(checkpoint.root, device, home)
        if expand and expander is None and isinstance(text, TextEncoder):
            expander = make_expander(text)
        return cls(checkpoint, dit, text, vae, device, offload=offload, sharing=sharing, expander=expander)

    @classmethod
    def from_resolved(cls, resolved, dtype: torch.dtype = torch.bfloat16, device="cpu", **kwargs):
        """Load what ``k5.engine.catalogue.resolve.resolve_model`` found: components from its root, the DiT from its
        file or folder with its config (the variant's attention applied). ``kwargs``: expand, adapters."""
        return cls.from_pretrained(resolved, dtype, device, config=resolved.config, **kwargs)

    # ---- where the weights are -------------------------------------------------------------------------------------

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

    # ---- text ------------------------------------------------------------------------------------------------------

    def default_task(self, req) -> str:
        raise NotImplementedError

    def expand_prompt(self, req, task: str | None = None, reuse=None) -> str:
        """The reference's expansion of ``req.prompt`` (seeded with ``req.seed``), computed once per item (on the item
        group's rank 0 in parallel runs) and returned on every rank. ``task``: default the family's for the request
        (i2v / t2v, i2i / t2i). ``reuse() -> str | None`` is asked first, where the expansion runs: a text it returns
        (the expansion a resumed job recorded) is shared instead of generating one. The caller encodes the result:
        ``generate(req, prompt=expanded)``."""
        if self.expander is None:
            raise RuntimeError("prompt expansion is not loaded: build the pipeline with expand=True")
        task = task or self.default_task(req)

        def expand():
            if isinstance(self.text, TextEncoder) and self.text.qwen is not None and self.offload != "none":
                self._place("text", self.device)  # encode() moves it off again right after the embedding
            return self.expander(req.prompt, task, req.seed, req.image)

        return self.sharing.text(lambda: expand_or_reuse(expand, reuse))

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

    # ---- one request -----------------------------------------------------------------------------------------------

    def check(self, req, chain):
        """The request as it runs (the family may resolve it), or ValueError for one this pipeline cannot run."""
        return req

    def prepare(self, req, prompt: str | None) -> Prepared:
        """The text phase of ``generate``: the prompts encoded and the family's conditioning."""
        raise NotImplementedError

    def result(self, req, latents: Tensor, timings: dict, truncated: bool) -> Result:
        return Result(latents, timings, truncated=truncated)

    @torch.inference_mode()
    def generate(self, req, on_step=None, chain=(), prompt: str | None = None) -> Result:
        """Sample one request. ``chain``: stages of the step chain (k5.engine.sampling.chain: CfgParallel, MagCache,
        ...; k5.parallel.plan's ParallelSetup.stages in front); ``prompt``: the text to encode instead of
        ``req.prompt`` (its expansion, see ``expand_prompt``)."""
        req = self.check(req, chain)
        # Clocks are read after a device sync: CUDA queues work, so an unsynchronised clock measures the queueing.
        sync(self.device)
        t0 = time.perf_counter()
        with PEAKS.phase("text", self.device):
            p = self.prepare(req, prompt)
            sync(self.device)
        t1 = time.perf_counter()
        with self.on_device("dit"):
            with PEAKS.phase("denoise", self.device):
                latents = sample(p.velocity, p.noise(), p.cond, p.uncond, steps=req.steps,
                                 guidance_scale=req.guidance_scale, shift=req.shift or self.default_shift,
                                 visual_cond=p.visual_cond, first_frame=p.first_frame, on_step=on_step, chain=chain)
                latents = p.finish(latents)
                sync(self.device)
            t2 = time.perf_counter()
        return self.result(req, latents, {"text_s": t1 - t0, "denoise_s": t2 - t1, "step_s": (t2 - t1) / req.steps},
                           p.truncated)

    def decoded(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """uint8 frames [F, H, W, 3] (an image: one frame)."""
        with self.on_device("vae"), PEAKS.phase("decode", self.device):
            frames = self.decoded(latents)
            sync(self.device)
        return frames
