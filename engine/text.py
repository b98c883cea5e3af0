"""Text conditioning for Kandinsky 5 video: Qwen2.5-VL hidden states + CLIP pooled embedding.

Follows the original Kandinsky code (kandinsky/models/text_embedders.py), not diffusers: the video template with
its typos, padding to 256 prompt tokens with a key mask, and no prompt cleaning. Diffusers 0.42 differs in details
that change the embeddings: typo fixed with crop 128, padding="longest" without a mask, ftfy cleaning.

Only the Qwen2.5-VL *text* decoder is loaded (the vision tower and lm_head of the 7B checkpoint are skipped), built
on the meta device and filled straight from the safetensors, so loading never materialises random weights.
"""

import gc
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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
# What the original hard-codes for the video template with the real Qwen2.5-VL tokenizer.
VIDEO_CROP_START = 129
QWEN_MAX_LENGTH = 256
CLIP_MAX_LENGTH = 77
DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)

COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@dataclass
class TextEmbeds:
    embeds: torch.Tensor  # [B, 256, Dq] Qwen last hidden state (after final RMSNorm), template cropped
    mask: torch.Tensor  # bool [B, 256], True = real prompt token (key-padding mask)
    pooled: torch.Tensor  # [B, Dclip] CLIP pooler_output
    truncated: list[bool]  # per prompt: did the prompt exceed the 256-token budget


def _component_dir(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"component '{name}' missing: expected folder {path} in the diffusers-format checkpoint {folder} "
            f"(a text pipeline needs {', '.join(COMPONENTS)})"
        )
    return path


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"component 'text_encoder' in {path.parent}: no *.safetensors file and no model.safetensors.index.json "
            f"in {path}"
        )
    return files


# Saved Qwen2_5_VLForConditionalGeneration checkpoints name the text decoder `model.language_model.*`
# (transformers >= 4.52) or `model.*` next to `visual.*` (older saves, e.g. the Qwen2.5-VL-7B-Instruct release).
_QWEN_TEXT_KEY = re.compile(r"^model\.(?:language_model\.)?(?!visual\.)(.+)$")


def _load_qwen_text_model(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, Qwen2_5_VLTextModel

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the component named
        raise ValueError(f"component 'text_encoder' in {path.parent}: cannot read {path / 'config.json'}: {e}") from e
    text_config = getattr(config, "text_config", None)
    if text_config is None:
        raise ValueError(
            f"component 'text_encoder' in {path.parent}: config model_type={config.model_type!r} has no text_config; "
            "expected a Qwen2_5_VLForConditionalGeneration checkpoint"
        )
    with torch.device("meta"):
        model = Qwen2_5_VLTextModel(text_config)
    expected = set(model.state_dict().keys())

    state = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    m = _QWEN_TEXT_KEY.match(key)
                    if m and m.group(1) in expected:
                        state[m.group(1)] = f.get_tensor(key).to(dtype)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"component 'text_encoder' in {path.parent}: cannot read {file}: {e}") from e
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(
            f"component 'text_encoder' in {path.parent}: {len(missing)} text-decoder weights not found "
            f"(first: {missing[:3]}); expected keys model.language_model.<name> or model.<name>"
        )
    model.load_state_dict(state, strict=False, assign=True)
    # RoPE frequencies are non-persistent fp32 buffers: rebuild them for real instead of leaving them on meta.
    model.rotary_emb = Qwen2_5_VLRotaryEmbedding(text_config).to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"text decoder tensors left unloaded on the meta device: {left}"
    return model.eval().requires_grad_(False)


def _load_tokenizer(path: Path, name: str):
    from transformers import AutoTokenizer

    try:
        # Only the tokenizer of the Qwen2VLProcessor folder: the image/video processors are never needed.
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"component '{name}' in {path.parent}: cannot load a tokenizer from {path}: {e}") from e


class TextEncoder:
    def __init__(self, qwen, qwen_tokenizer, clip, clip_tokenizer):
        self.qwen, self.qwen_tokenizer, self.clip, self.clip_tokenizer = qwen, qwen_tokenizer, clip, clip_tokenizer
        # The crop must sit on the template/prompt boundary, so padding has to go at the end.
        self.qwen_tokenizer.padding_side = "right"
        self.clip_tokenizer.padding_side = "right"
        self.crop_start = len(self.qwen_tokenizer(VIDEO_TEMPLATE_PREFIX)["input_ids"])
        if self.crop_start != VIDEO_CROP_START:
            warnings.warn(
                f"the video template prefix is {self.crop_start} tokens with this tokenizer; the original Kandinsky "
                f"code hard-codes {VIDEO_CROP_START} (real Qwen2.5-VL tokenizer). Cropping at {self.crop_start}."
            )

    @classmethod
    def from_pretrained(cls, folder, torch_dtype: torch.dtype = torch.bfloat16, device="cpu") -> "TextEncoder":
        from transformers import CLIPTextModel

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        device = torch.device(device)
        qwen = _load_qwen_text_model(_component_dir(folder, "text_encoder"), torch_dtype, device)
        qwen_tokenizer = _load_tokenizer(_component_dir(folder, "tokenizer"), "tokenizer")
        clip_dir = _component_dir(folder, "text_encoder_2")
        try:
            clip = CLIPTextModel.from_pretrained(clip_dir, dtype=torch_dtype).to(device)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"component 'text_encoder_2' in {folder}: cannot load CLIPTextModel from {clip_dir}: {e}"
            ) from e
        clip_tokenizer = _load_tokenizer(_component_dir(folder, "tokenizer_2"), "tokenizer_2")
        return cls(qwen, qwen_tokenizer, clip.eval().requires_grad_(False), clip_tokenizer)

    @property
    def device(self) -> torch.device:
        self._check_loaded()
        return self.qwen.embed_tokens.weight.device

    def _check_loaded(self):
        if self.qwen is None:
            raise RuntimeError("TextEncoder.release() was called: load a new one with TextEncoder.from_pretrained")

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> TextEmbeds:
        self._check_loaded()
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, got a single str; wrap it: encode([prompt])")
        device = self.device
        texts = [VIDEO_PROMPT_TEMPLATE.format(p) for p in prompts]
        max_length = QWEN_MAX_LENGTH + self.crop_start
        full_lengths = [len(ids) for ids in self.qwen_tokenizer(texts)["input_ids"]]
        tokens = self.qwen_tokenizer(
            texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
        ).to(device)
        # input_ids only, as the original: the decoder is causal and pads sit at the end, so they never reach real
        # tokens. last_hidden_state is hidden_states[-1] (after the final RMSNorm).
        hidden = self.qwen(input_ids=tokens["input_ids"]).last_hidden_state
        embeds = hidden[:, self.crop_start :]
        mask = tokens["attention_mask"][:, self.crop_start :].bool()

        clip_tokens = self.clip_tokenizer(
            list(prompts), max_length=CLIP_MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt"
        ).to(device)
        pooled = self.clip(**clip_tokens).pooler_output
        return TextEmbeds(embeds, mask, pooled, [n > max_length for n in full_lengths])

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
        self.qwen = self.clip = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
