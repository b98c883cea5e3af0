"""The command line's two families: video checkpoints (t2v, i2v) and Image Lite checkpoints (t2i, i2i).

Which family a run is follows the checkpoint (its VAE: the FLUX AutoencoderKL is Image Lite's), and which task
follows the checkpoint too (its model_index.json pipeline or its variant), the source image of a request (an edit),
or ``--task`` where the checkpoint can run both (an I2I checkpoint runs T2I with zeros for the edit input; ``--model
tiny-image`` is one tiny checkpoint per task). Everything here runs before any weight loads and raises ValueError
with one message:

- the other family's settings are refused: frames, NABLA attention and MagCache on an image model (an image is one
  frame, Image Lite is dense, the reference has no MagCache ratios for it), an image task or a PNG on a video model;
- the defaults are the family's own: video 512x768, 121 frames, guidance 5 and the reference negative prompt; images
  50 steps, guidance 3.5, an empty negative prompt, and the size of the bucket (the source image's nearest for an
  edit, else 1024x1024); a size outside the buckets is snapped to the nearest in aspect ratio with a note;
- the requests: ``ImageRequest`` for images, from the command line and from each prompt-file line (whose ``image``
  is the source of an edit and whose ``num_frames`` is refused).
"""

from __future__ import annotations

import json
from pathlib import Path

from k5.engine.pipelines.image_request import GUIDANCE_SCALE, STEPS, ImageRequest, check_task, reject_image_settings, \
    reject_video_settings

VIDEO_TASKS, IMAGE_TASKS = ("t2v", "i2v"), ("t2i", "i2i")
# Without a variant, an image request's defaults (the reference image pipelines' and diffusers'): the size is left
# to engine.pipelines.image_request.resolve (the source image's bucket for an edit, else 1024x1024).
IMAGE_BUILT_IN = {"steps": STEPS, "guidance_scale": GUIDANCE_SCALE}


def prompts_have_images(path: str | None) -> bool:
    """Whether a prompt file's lines name a source image (a quick look; read_prompts checks every line later)."""
    if path is None:
        return False
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return False
    if Path(path).suffix.lower() in (".jsonl", ".ndjson"):
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("image"):
                return True
        return False
    if Path(path).suffix.lower() == ".csv":
        import csv
        import io

        return any((row.get("image") or "").strip() for row in csv.DictReader(io.StringIO(text)))
    return False


def tiny_task(args) -> str | None:
    """The task that picks a tiny model's checkpoint: ``--task``, else (no variant) an edit when a source image is
    given (``--image`` or a prompt file's ``image`` field), else the model's first task. None: the variant's."""
    if args.task is not None:
        return args.task
    if args.variant is not None:
        return None
    if args.model == "tiny-image":
        return "i2i" if args.image is not None or prompts_have_images(args.prompts) else "t2i"
    return None


def check_family(args, image_model: bool) -> None:
    """Refuse the settings of the other family (called once the checkpoint is known, before any default is filled
    in: ``args.num_frames`` is still what the user gave)."""
    if args.task is not None:
        check_task(args.task, image_model)
    if image_model:
        reject_video_settings(num_frames=args.num_frames, nabla=args.attention == "nabla",
                              nabla_threshold=args.nabla_threshold)
        if args.magcache:
            raise ValueError("--magcache skips steps with ratios calibrated per checkpoint, and the reference has none "
                             "for Image Lite (its configs have no magcache section); drop --magcache")
        return
    reject_image_settings(output=args.output)
    if args.task == "t2v" and args.image is not None:
        raise ValueError("--task t2v makes a video from text alone; drop --image, or use --task i2v")
    if args.task == "i2v" and args.image is None and args.prompts is None:
        raise ValueError("--task i2v animates an image: pass --image PATH")


def check_video_task(task: str | None, req) -> None:
    """A video request against ``--task`` (each prompt-file line: its ``image`` makes it i2v)."""
    if task == "t2v" and req.image is not None:
        raise ValueError("--task t2v takes no image; drop the image, or use --task i2v")
    if task == "i2v" and req.image is None:
        raise ValueError("--task i2v needs an image to animate: give 'image' (or --image)")


def image_request(**fields) -> ImageRequest:
    """An ImageRequest from a prompt file's fields (and the command line's defaults); a video field is refused."""
    frames = fields.pop("num_frames", None)
    if frames is not None and frames != 1:
        raise ValueError(f"'num_frames' {frames}: an image is one frame and this is an Image Lite checkpoint; drop "
                         f"the field")
    return ImageRequest(**fields)


def describe_notes(item) -> list[str]:
    """What resolving an item's request changed (a size snapped to a bucket), as lines for the log."""
    return [f"{item.where}: {note}" for note in getattr(item.request, "notes", [])]
