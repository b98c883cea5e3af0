"""Image Lite requests: sizes (the resolution buckets), the task, the source image of an edit, and bad-input checks.

Kandinsky 5 Image Lite (T2I and I2I, architecture reference sections 1.1, 4.1, 5.5) is the video DiT on one latent
frame: 20 heads of 128, RoPE scale (1, 1, 1), the FLUX VAE, prompts in the "image" template (T2I) or the
"image_edit" template with the source image as vision tokens (I2I), guidance 3.5, 50 steps. Its DiT was trained on
seven 1024-class sizes; the original refuses any other size and diffusers snaps it to the bucket nearest in aspect
ratio. We snap too (a production engine should run a request it can serve) and say so in a note the CLI prints.

Everything here runs before any weight is loaded, so a bad request fails in a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from k5.engine.media.image import image_size, load_rgb
from k5.engine.model.config import DiTConfig

# (height, width) of the original's RESOLUTIONS[1024], in its order.
BUCKETS = ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896))
DEFAULT_SIZE = BUCKETS[0]
GUIDANCE_SCALE = 3.5  # configs/config_t2i.yaml and config_i2i.yaml: guidance_weight
STEPS = 50  # num_steps of both configs
# The original's image pipelines default to scheduler_scale 3.0 (its test.py passes 5.0); a diffusers checkpoint's
# scheduler_config.json shift takes precedence, as for video.
DEFAULT_SHIFT = 3.0
# The original's image pipelines default negative_caption to "" (diffusers too), not the video negative prompt.
NEGATIVE_PROMPT = ""
ROPE_SCALE = (1.0, 1.0, 1.0)
TASKS = ("t2i", "i2i")


def bucket_list() -> str:
    return ", ".join(f"{h}x{w}" for h, w in BUCKETS)


def nearest_bucket(height: int, width: int) -> tuple[int, int]:
    """The bucket with the closest aspect ratio h/w (the original's find_nearest; first one on a tie)."""
    return min(BUCKETS, key=lambda b: abs(b[0] / b[1] - height / width))


def checkpoint_task(cfg: DiTConfig) -> str:
    """The task an Image Lite DiT was trained for: I2I checkpoints have the edit-latent input (33 channels)."""
    return "i2i" if cfg.visual_cond else "t2i"


@dataclass
class ImageRequest:
    prompt: str
    negative_prompt: str = NEGATIVE_PROMPT
    height: int | None = None  # None: the source image's bucket (I2I), else 1024x1024
    width: int | None = None
    steps: int = STEPS
    guidance_scale: float = GUIDANCE_SCALE
    shift: float | None = None  # None: the checkpoint's scheduler config, else 3.0
    seed: int = 0
    image: str | None = None  # I2I source image
    task: str | None = None  # "t2i" | "i2i"; None: i2i with an image, else the checkpoint's own task
    notes: list[str] = field(default_factory=list)  # what resolve() changed, for the user

    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, 1, self.height // 8, self.width // 8, 16)

    @property
    def num_frames(self) -> int:
        """One: what an image is to code that sizes requests by frames (memory estimates, compile shapes)."""
        return 1


def resolve(req: ImageRequest, cfg: DiTConfig) -> ImageRequest:
    """Check ``req`` against an Image Lite DiT config and fill in task and size; raise ValueError naming what is
    wrong and what would be right. Returns a new request whose ``notes`` say what was changed."""
    notes = list(req.notes)
    if not req.prompt or not req.prompt.strip():
        raise ValueError("the prompt is empty; give a text describing the image (or, for I2I, the edit)")
    # No task given: an image means editing, else the checkpoint's own task.
    task = req.task or ("i2i" if req.image is not None else checkpoint_task(cfg))
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not an image task; Image Lite checkpoints run {' or '.join(TASKS)}")
    if task == "i2i":
        if not cfg.visual_cond:
            raise ValueError(
                "this is a text-to-image checkpoint: its DiT has no input for a source image, so it cannot edit; "
                "use an I2I checkpoint (kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers) or drop the image"
            )
        if req.image is None:
            raise ValueError("image editing (i2i) needs a source image: pass --image PATH (in a prompt file, the "
                             "`image` field)")
    elif req.image is not None:
        raise ValueError("text-to-image (t2i) takes no source image; drop the image, or run i2i on an I2I "
                         "checkpoint to edit it")
    if req.steps < 1:
        raise ValueError(f"steps must be at least 1, got {req.steps}")
    if req.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {req.guidance_scale}")
    if req.shift is not None and req.shift <= 0:
        raise ValueError(f"shift must be > 0, got {req.shift}")

    height, width = req.height, req.width
    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither (the bucket then follows the source image, or is "
                         f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")
    if height is None:
        if req.image is not None:
            height, width = nearest_bucket(*image_size(req.image))
        else:
            height, width = DEFAULT_SIZE
    else:
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
        if req.image is not None:
            image_size(req.image)  # readable
        if (height, width) not in BUCKETS:
            h, w = nearest_bucket(height, width)
            notes.append(f"{height}x{width} is not one of the sizes Image Lite was trained at ({bucket_list()}); "
                         f"using {h}x{w}, the nearest in aspect ratio")
            height, width = h, w
    return replace(req, task=task, height=height, width=width, notes=notes)


VIDEO_ONLY = {"num_frames": "--num-frames", "nabla": "--attention nabla", "nabla_threshold": "--nabla-threshold"}


def reject_video_settings(**given) -> None:
    """Raise if a setting that only means something for video is given for an Image Lite checkpoint.

    Keywords (None or False = not given): num_frames, nabla (NABLA attention asked for), nabla_threshold.
    """
    for key, value in given.items():
        if key not in VIDEO_ONLY:
            raise TypeError(f"unknown video setting {key!r}; known: {', '.join(VIDEO_ONLY)}")
        if value is None or value is False:
            continue
        if key == "num_frames" and value == 1:
            continue  # one frame is what an image is
        why = ("an image is one frame" if key == "num_frames" else
               "NABLA sparsifies attention over video frames; Image Lite was trained with dense attention")
        raise ValueError(f"{VIDEO_ONLY[key]} is a video setting and this is an Image Lite checkpoint ({why}); "
                         f"drop {VIDEO_ONLY[key].split()[0]}")


def reject_image_settings(task: str | None = None, output: str | None = None) -> None:
    """Raise if an image-only setting is given for a video checkpoint: an image task, or a PNG output."""
    if task in TASKS:
        raise ValueError(f"--task {task} needs an Image Lite checkpoint (its VAE is the FLUX AutoencoderKL); this "
                         f"is a video checkpoint: use --task t2v or i2v, or a Kandinsky-5.0-{task.upper()}-Lite model")
    if output is not None and Path(output).suffix.lower() == ".png":
        raise ValueError(f"{output}: a video checkpoint writes MP4 videos, not PNG images; name the output .mp4")


def check_task(task: str, image_model: bool) -> None:
    """Raise if ``task`` (t2v, i2v, t2i, i2i) does not fit the checkpoint family."""
    video_tasks = ("t2v", "i2v")
    if task not in TASKS + video_tasks:
        raise ValueError(f"task {task!r} is not one of t2v, i2v, t2i, i2i")
    if image_model and task in video_tasks:
        raise ValueError(f"--task {task} makes a video, and this is an Image Lite checkpoint (t2i or i2i); use a "
                         f"Kandinsky 5 video checkpoint for {task}")
    if not image_model:
        reject_image_settings(task=task)


# -- the source image of an edit --------------------------------------------------------------------------------


def load_source(path: str | Path) -> torch.Tensor:
    """An image file -> uint8 RGB [3, H, W] as displayed (engine/media/image.py: EXIF orientation applied, alpha
    dropped), as I2V's first frame is read."""
    return load_rgb(path)


def _resize_uint8(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # What torchvision's resize does to a uint8 tensor (the original's F.resize): bilinear with antialiasing in float,
    # rounded back to uint8.
    if tuple(img.shape[-2:]) == (height, width):
        return img
    x = F.interpolate(img[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def fit_to_bucket(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, height, width]: scaled to cover the bucket keeping its aspect, centre-cropped
    (the original's resize_video)."""
    if img.ndim != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 RGB image [3, H, W], got {img.dtype} {tuple(img.shape)}")
    H, W = img.shape[-2:]
    if (H, W) != (height, width):
        scale = min(H / height, W / width)
        img = _resize_uint8(img, int(H / scale), int(W / scale))
    H, W = img.shape[-2:]
    top, left = (H - height) // 2, (W - width) // 2
    return img[:, top : top + height, left : left + width].contiguous()


def qwen_image(img: torch.Tensor) -> np.ndarray:
    """The fitted source image as the original hands it to Qwen: half its size (uint8 [H/2, W/2, 3])."""
    half = _resize_uint8(img, img.shape[-2] // 2, img.shape[-1] // 2)
    return half.permute(1, 2, 0).numpy()


def vae_input(img: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> float [1, 3, H, W] in [-1, 1] (the original's x / 127.5 - 1)."""
    return img[None].float() / 127.5 - 1.0


def grid_tokens(height: int, width: int) -> int:
    """Visual tokens of one image: (H/16) * (W/16) (8x VAE, 2x2 patches)."""
    return math.prod((height // 16, width // 16))
