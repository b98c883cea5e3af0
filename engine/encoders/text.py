"""Text conditioning for Kandinsky 5: Qwen2.5-VL hidden states + CLIP pooled embedding.

Follows the original Kandinsky code (kandinsky/models/text_embedders.py), not diffusers: the templates with their
typos, padding to the model's prompt budget with a key mask (video 256 tokens, image 512), and no prompt cleaning.
Diffusers 0.42 differs in details that change the embeddings: typo fixed with the crops one smaller,
padding="longest" without a mask, ftfy cleaning.

Only the Qwen2.5-VL *text* decoder is loaded up front (the vision tower and lm_head of the 7B checkpoint are
skipped), built on the meta device and filled straight from the safetensors, so loading never materialises random
weights (engine/checkpoints/qwen.py reads every part). The vision tower joins (engine/encoders/vision.py) the first
time a prompt carries an image: image editing. Prompt expansion (engine/encoders/expand.py) also needs the lm_head:
``from_pretrained(..., lm_head=True)`` loads it, and ``generate`` decodes with the same decoder module (no second
copy of the 7B weights).
"""

import gc
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from k5.engine.checkpoints import qwen as qwen_checkpoint

# Byte-exact copy of the original template; "promt" and "scren" are in the checkpoint's training data.
VIDEO_PROMPT_TEMPLATE = "\n".join(
    [
        "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
        "Describe the location of the video, main characters or objects and their action.",
        "Describe the dynamism of the video and presented actions.",
        "Name the visual style of the video: whether it is a professional footage, user generated content, some kind of animation, video game or scren content.",
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    ]
)
VIDEO_TEMPLATE_PREFIX = VIDEO_PROMPT_TEMPLATE.split("{}")[0]
# The original's "image" template (T2I, and I2I checkpoints run without a source image) and its "image_edit" template
# (I2I): the prompt, then the source image's vision tokens appended as the original appends them.
IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>"
)
IMAGE_EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) and target image "
    "(second image), create an interesting text prompt that can be used together with the source image to create "
    "the target image:<|im_end|>\n<|im_start|>user\n{}<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
)
# What the original hard-codes for the video template with the real Qwen2.5-VL tokenizer.
VIDEO_CROP_START = 129
QWEN_MAX_LENGTH = 256
CLIP_MAX_LENGTH = 77
DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)

@dataclass(frozen=True)
class PromptFormat:
    """How one family of models wraps, crops and budgets its prompts (the original's `type_of_content`)."""

    name: str
    template: str  # one "{}" for the user prompt
    crop_start: int | None  # leading tokens dropped; None: the video template's prefix length in this tokenizer
    max_length: int  # tokens kept after the crop (padded to it, except with an image)
    with_image: bool = False  # the template carries the source image's vision tokens (Qwen's vision tower runs)


VIDEO = PromptFormat("video", VIDEO_PROMPT_TEMPLATE, None, QWEN_MAX_LENGTH)
# The original hard-codes 41 and 55 and crops there whatever the tokenizer; so do we. The edit prompt is not padded
# and has no budget in the original; 1024 cropped tokens (prompt + about 300 image tokens) is the length of the
# original DiT's text RoPE table and diffusers' I2I max_sequence_length, so longer prompts are cut at their end.
IMAGE = PromptFormat("image", IMAGE_PROMPT_TEMPLATE, 41, 512)
IMAGE_EDIT = PromptFormat("image_edit", IMAGE_EDIT_PROMPT_TEMPLATE, 55, 1024, with_image=True)


@dataclass
class TextEmbeds:
    embeds: torch.Tensor  # [B, L, Dq] last hidden state (after the final RMSNorm), template cropped; L: the budget
    # (256 video, 512 image), or the longest prompt with its image tokens for image-edit prompts (not padded)
    mask: torch.Tensor  # bool [B, L], True = real prompt token (key-padding mask)
    pooled: torch.Tensor  # [B, Dclip] CLIP pooler_output, fp32 (the DiT casts it at its input, as the original)
    truncated: list[bool]  # per prompt: did the prompt exceed the format's token budget


class TextEncoder:
    def __init__(self, qwen, qwen_tokenizer, clip, clip_tokenizer, folder: Path | None = None, lm_head=None,
                 generation_config=None):
        self.qwen, self.qwen_tokenizer, self.clip, self.clip_tokenizer = qwen, qwen_tokenizer, clip, clip_tokenizer
        self.folder = folder  # the checkpoint, where the vision tower is read from when an image prompt comes
        self.vision = None  # engine.encoders.vision.QwenVision, loaded on first use
        # For generate(): the head on the decoder's final norm, and the checkpoint's generation settings.
        self.lm_head, self.generation_config = lm_head, generation_config
        self._generator = None
        # The crop must sit on the template/prompt boundary, so padding has to go at the end.
        self.qwen_tokenizer.padding_side = "right"
        self.clip_tokenizer.padding_side = "right"
        self._crop_start = None

    @property
    def crop_start(self) -> int:
        """The video template's prefix length in this tokenizer (checked on first use: image models never ask)."""
        if self._crop_start is None:
            self._crop_start = len(self.qwen_tokenizer(VIDEO_TEMPLATE_PREFIX)["input_ids"])
            if self._crop_start != VIDEO_CROP_START:
                warnings.warn(
                    f"the video template prefix is {self._crop_start} tokens with this tokenizer; the original "
                    f"Kandinsky code hard-codes {VIDEO_CROP_START} (real Qwen2.5-VL tokenizer). Cropping at "
                    f"{self._crop_start}."
                )
        return self._crop_start

    @classmethod
    def from_pretrained(cls, folder, torch_dtype: torch.dtype = torch.bfloat16, device="cpu",
                        lm_head: bool = False) -> "TextEncoder":
        """``lm_head=True`` also loads the language-model head, for ``generate`` (prompt expansion)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        device = torch.device(device)
        qwen_dir = qwen_checkpoint.component_dir(folder, "text_encoder")
        qwen = qwen_checkpoint.load_text_decoder(qwen_dir, torch_dtype, device)
        head = generation_config = None
        if lm_head:
            head = qwen_checkpoint.load_lm_head(qwen_dir, qwen, torch_dtype, device)
            generation_config = qwen_checkpoint.load_generation_config(qwen_dir, qwen.full_config)
        qwen_tokenizer = qwen_checkpoint.load_tokenizer(qwen_checkpoint.component_dir(folder, "tokenizer"), "tokenizer")
        clip = qwen_checkpoint.load_clip(folder, device)
        clip_tokenizer = qwen_checkpoint.load_tokenizer(qwen_checkpoint.component_dir(folder, "tokenizer_2"),
                                                        "tokenizer_2")
        return cls(qwen, qwen_tokenizer, clip, clip_tokenizer, folder, head, generation_config)

    @property
    def device(self) -> torch.device:
        self._check_loaded()
        return self.qwen.embed_tokens.weight.device

    def _check_loaded(self):
        if self.qwen is None:
            raise RuntimeError("TextEncoder.release() was called: load a new one with TextEncoder.from_pretrained")

    def _load_vision(self):
        if self.vision is None:
            from k5.engine.encoders.vision import QwenVision

            if self.folder is None:
                raise RuntimeError("an image prompt needs the vision tower: build the encoder with from_pretrained")
            dtype = self.qwen.embed_tokens.weight.dtype
            self.vision = QwenVision.from_pretrained(self.folder, self.qwen, dtype, self.device)
        return self.vision

    @torch.inference_mode()
    def encode(self, prompts: list[str], fmt: PromptFormat = VIDEO, images: list | None = None) -> TextEmbeds:
        """Embed ``prompts`` in ``fmt``; formats with an image take one RGB image (uint8 [H, W, 3] or PIL) per
        prompt, already at the size the original hands to Qwen (engine.pipelines.image_request.qwen_image)."""
        self._check_loaded()
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, got a single str; wrap it: encode([prompt])")
        if fmt.with_image != (images is not None) or (images is not None and len(images) != len(prompts)):
            raise ValueError(f"the {fmt.name!r} prompt format takes "
                             + ("one image per prompt" if fmt.with_image else "no image"))
        device = self.device
        texts = [fmt.template.format(p) for p in prompts]
        crop = self.crop_start if fmt.crop_start is None else fmt.crop_start
        if fmt.with_image:
            embeds, mask, truncated = self._load_vision().encode(self.qwen_tokenizer, texts, images, crop,
                                                                 fmt.max_length)
        else:
            embeds, mask, truncated = self._encode_text(texts, crop, fmt.max_length)

        clip_tokens = self.clip_tokenizer(
            list(prompts), max_length=CLIP_MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt"
        ).to(device)
        pooled = self.clip(**clip_tokens).pooler_output
        return TextEmbeds(embeds, mask, pooled, truncated)

    def _encode_text(self, texts: list[str], crop: int, budget: int):
        max_length = budget + crop
        full_lengths = [len(ids) for ids in self.qwen_tokenizer(texts)["input_ids"]]
        tokens = self.qwen_tokenizer(
            texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
        ).to(self.device)
        # input_ids only, as the original: the decoder is causal and pads sit at the end, so they never reach real
        # tokens. last_hidden_state is hidden_states[-1] (after the final RMSNorm).
        hidden = self.qwen(input_ids=tokens["input_ids"]).last_hidden_state
        embeds = hidden[:, crop:]
        mask = tokens["attention_mask"][:, crop:].bool()
        return embeds, mask, [n > max_length for n in full_lengths]

    def _generation_model(self):
        """Qwen2_5_VLForConditionalGeneration around the loaded modules (its own, built on meta, are replaced):
        transformers' generate() then runs with the reference's decoding rules (logits processors, 3D RoPE
        positions for image tokens) on this decoder and head, with no second copy of the weights."""
        if self.lm_head is None:
            raise RuntimeError("generate() needs the lm_head: load with TextEncoder.from_pretrained(..., lm_head=True)")
        if self._generator is None:
            from transformers import Qwen2_5_VLForConditionalGeneration

            with torch.device("meta"):
                model = Qwen2_5_VLForConditionalGeneration(self.qwen.full_config)
            model.model.language_model = self.qwen
            model.lm_head = self.lm_head
            model.generation_config = self.generation_config
            self._generator = model.eval()
        # The vision tower once an image prompt has loaded it (engine.encoders.vision); until then an empty module, so that no
        # meta parameter is left (the model's device is that of its first parameter).
        self._generator.model.visual = self.vision.tower if self.vision is not None else torch.nn.Module()
        return self._generator

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, seed: int, attention_mask=None,
                 **image_inputs) -> torch.Tensor:
        """The token ids generated after ``input_ids`` [1, L] (the prompt itself is not returned).

        Settings are the checkpoint's generation_config.json (as ``from_pretrained`` + ``generate`` use them in the
        reference), with ``max_new_tokens``; sampling, if the config asks for it, draws after
        ``torch.manual_seed(seed)`` (as after the reference's ``transformers.set_seed(seed)``) inside a forked RNG
        state, so the caller's RNG state is left as it was.
        ``image_inputs``: pixel_values, image_grid_thw, mm_token_type_ids for a prompt that shows an image (the
        vision tower must be loaded: ``_load_vision``)."""
        self._check_loaded()
        model = self._generation_model()
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in image_inputs.items()}
        # manual_seed seeds every GPU, so every GPU's state is saved and restored, not only this one's.
        devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask.to(device),
                                 max_new_tokens=max_new_tokens, **image_inputs)
        return out[:, input_ids.shape[1]:]

    def to(self, device) -> "TextEncoder":
        """Move both encoders, e.g. off the GPU once the prompts are encoded and back for the next item."""
        self._check_loaded()
        # Every model this encoder holds (the vision tower and lm_head of prompt expansion too, where loaded).
        for name in ("qwen", "clip", "vision", "lm_head"):
            module = getattr(self, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(device)
        return self

    def release(self):
        """Drop the models (a batch job keeps the encoder; a single generation frees it before the DiT runs)."""
        on_cuda = self.qwen is not None and self.device.type == "cuda"
        self.qwen = self.clip = self.vision = self.lm_head = self._generator = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
