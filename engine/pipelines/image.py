"""Text to image and image editing (Kandinsky 5 Image Lite) on one device: text -> DiT sampling -> FLUX VAE decode.

The same DiT, sampler and text encoders as video (engine.pipelines.video), on a one-frame latent [1, 1, H/8, W/8, 16] with
RoPE scale (1, 1, 1). What differs is the conditioning:
- T2I: the "image" prompt template (512-token budget); the DiT of a T2I checkpoint takes the 16 latent channels.
- I2I: the source image, fitted to the bucket, goes to Qwen (half size, as vision tokens in the "image_edit" template)
  and to the DiT as its VAE latent: input [noise(16), edit latent(16), ones(1)] at every step, only the first 16
  channels integrated (the original's instruct_type "channel"; diffusers' Kandinsky5I2IPipeline does the same).
  An I2I checkpoint asked for T2I gets zeros in both extra parts, as the original does without an image.
The noise and the source image's posterior sample come from one CPU generator seeded with the request's seed, in that
order, as diffusers' I2I pipeline draws them: the same latents on every device and world size.

Parallel runs use this class unchanged: k5.parallel.plan applies itself to ``pipeline.dit`` and ``pipeline.text``,
``sharing.image`` encodes the source image on one rank and broadcasts it, and ``generate(chain=...)`` takes the step
chain's stages (CFG parallel) as the video pipeline does (engine/pipelines/base.py: one generate skeleton). MagCache is refused: the reference calibrated its ratios on
the video models only, and a stage without ratios would skip on guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from k5.engine.checkpoints.files import Checkpoint, is_image_checkpoint
from k5.engine.model.config import DiTConfig
from k5.engine.pipelines.image_request import DEFAULT_SHIFT as IMAGE_DEFAULT_SHIFT
from k5.engine.pipelines.image_request import (ROPE_SCALE, ImageRequest, fit_to_bucket, load_source, qwen_image,
                                               resolve, vae_input)
from k5.engine.vae.image import ImageVAE
from k5.engine.vae.video import vae_dtype
from k5.engine.pipelines.base import Pipeline, Prepared, Result
from k5.engine.pipelines.video import Kandinsky5Pipeline
from k5.engine.sampling.sampler import Conditioning, uses_cfg
from k5.engine.encoders.text import IMAGE, IMAGE_EDIT, PromptFormat


@dataclass
class ImageResult(Result):
    request: ImageRequest | None = None  # the resolved request (task, bucket size, notes)


def check_image_checkpoint(checkpoint: Checkpoint, config: DiTConfig | None = None) -> DiTConfig:
    """The DiT config of an Image Lite checkpoint (``config``: the one to build, default the checkpoint's);
    ValueError for anything else. Reads config files only: the ``Checkpoint`` was checked when it was opened."""
    if not checkpoint.image:
        raise ValueError(f"{checkpoint.root} is not a Kandinsky 5 Image Lite checkpoint: its vae/ is not the FLUX "
                         f"AutoencoderKL (a video checkpoint runs t2v/i2v)")
    cfg = config or checkpoint.dit.config
    if cfg.uses_nabla:
        raise ValueError(f"{checkpoint.root}: the DiT config asks for NABLA attention, which Image Lite does not use; "
                         f"fix attention_type in transformer/config.json")
    return cfg


def refuse_magcache(chain) -> None:
    """Raise if the step chain caches steps: MagCache needs per-checkpoint ratios, and the reference has none for
    Image Lite (its configs config_t2i.yaml / config_i2i.yaml have no magcache section)."""
    from k5.engine.sampling.magcache import MagCache

    if any(isinstance(stage, MagCache) for stage in chain):
        raise ValueError("MagCache has no ratios for Image Lite (the reference calibrated it on the video models "
                         "only); drop --magcache")


def pipeline_class(source):
    """The pipeline that runs a checkpoint (a folder or a Checkpoint): ImagePipeline for Image Lite (FLUX VAE), else
    Kandinsky5Pipeline. Reads config files only."""
    root = source.root if isinstance(source, Checkpoint) else source
    return ImagePipeline if is_image_checkpoint(root) else Kandinsky5Pipeline


class ImagePipeline(Pipeline):
    """The image pipeline (T2I, I2I), the video pipeline's sibling over the same components (engine/pipelines/base.py):
    the FLUX ImageVAE (bf16 on GPU as the original runs it; fp32 on CPU, where half precision is slow and inexact),
    the image prompt formats, and an edit's source image as Qwen's vision input and the DiT's extra channels."""

    DEFAULT_SHIFT = IMAGE_DEFAULT_SHIFT  # the image pipelines' 3.0, not video's 5.0

    @classmethod
    def check_checkpoint(cls, checkpoint: Checkpoint, config: DiTConfig | None) -> None:
        check_image_checkpoint(checkpoint, config)

    @classmethod
    def load_vae(cls, root, device: torch.device, home: torch.device) -> ImageVAE:
        return ImageVAE.from_pretrained(root, vae_dtype(device, image=True), home)

    def default_task(self, req: ImageRequest) -> str:
        return "i2i" if req.image is not None else "t2i"

    def resolve(self, req: ImageRequest) -> ImageRequest:
        return resolve(req, self.dit.config)

    def encode(self, prompts: list[str], fmt: PromptFormat = IMAGE, image=None
               ) -> tuple[list[Conditioning], list[bool]]:
        """The shared encode (the encoders placed and offloaded as for video) in an image prompt format; an edit's
        source image (as Qwen takes it, engine.pipelines.image_request.qwen_image) goes with every prompt."""
        images = None if image is None else [image] * len(prompts)
        return super().encode(prompts, fmt=fmt, images=images)

    def velocity(self, inp: Tensor, t: Tensor, c: Conditioning, extra: Tensor | None, **dit_kwargs) -> Tensor:
        x = inp if extra is None else torch.cat([inp, extra.to(inp.dtype)], -1)
        return self.dit(x, c.embeds, c.pooled, t, scale_factor=ROPE_SCALE, text_mask=c.mask, **dit_kwargs)

    def extra_channels(self, edit: Tensor | None, shape) -> Tensor | None:
        """What the DiT takes besides the noisy latent: nothing (T2I checkpoint), [edit latent, ones] (I2I), or
        zeros (an I2I checkpoint run as T2I)."""
        if not self.dit.config.visual_cond:
            return None
        if edit is None:
            return torch.zeros(*shape[:-1], shape[-1] + 1, device=self.device)
        return torch.cat([edit, torch.ones_like(edit[..., :1])], -1)

    def source_latent(self, source: Tensor, generator: torch.Generator) -> Tensor:
        """The fitted source image's VAE latent (a posterior sample from ``generator``), on one rank of the item's
        group in parallel runs (``sharing.image``)."""
        def encode():
            with self.on_device("vae"):
                return self.vae.encode(vae_input(source), generator=generator).to(self.device)

        return self.sharing.image(encode)

    def check(self, req: ImageRequest, chain) -> ImageRequest:
        if self.dit.nabla is not None:
            raise ValueError("NABLA attention is for video; Image Lite runs dense attention (--attention dense)")
        refuse_magcache(chain)
        return self.resolve(req)

    def prepare(self, req: ImageRequest, prompt: str | None) -> Prepared:
        shape = req.latent_shape()
        generator = torch.Generator("cpu").manual_seed(req.seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        edit, fmt, qwen_input = None, IMAGE, None
        if req.image is not None:
            source = fit_to_bucket(load_source(req.image), req.height, req.width)
            edit = self.source_latent(source, generator)  # after the noise: diffusers' order of draws
            fmt, qwen_input = IMAGE_EDIT, qwen_image(source)
        prompts = [req.prompt if prompt is None else prompt]
        prompts += [req.negative_prompt] if uses_cfg(req.guidance_scale) else []
        conds, truncated = self.encode(prompts, fmt, qwen_input)
        extra = self.extra_channels(edit, shape)
        return Prepared(lambda inp, t, c, **kw: self.velocity(inp, t, c, extra, **kw), lambda: noise, conds[0],
                        conds[1] if len(conds) > 1 else None, truncated[0])

    def result(self, req: ImageRequest, latents: Tensor, timings: dict, truncated: bool) -> ImageResult:
        return ImageResult(latents, timings, truncated=truncated, request=req)

    def decoded(self, latents: Tensor) -> Tensor:
        """uint8 image as one frame [1, H, W, 3]."""
        return self.vae.decode(latents)
