"""Qwen2.5-VL's vision tower, for prompts that carry an image (Image Lite editing, I2I).

The edit template ends with the source image's vision tokens; Qwen's vision tower turns the image into the embeddings
that replace its `<|image_pad|>` tokens, and the decoder runs with Qwen's 3D (multimodal) RoPE positions. The tower
is read from the same text_encoder checkpoint as the decoder (engine/checkpoints/qwen.py), on the meta device and
filled straight from the safetensors, and only when an image prompt comes: video and T2I runs never load it.

The image is preprocessed by transformers' Qwen2-VL image processor through its PIL backend
(`Qwen2VLImageProcessorPil`), because torchvision, which the original's fast processor needs, is not a dependency
here. Both resize with bicubic filtering to the same grid; the pixel values differ at the filter level only.
The placeholder expansion (one `<|image_pad|>` per merged 2x2 patch group) is what Qwen2VLProcessor does; tests check
it against the processor itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from k5.engine.checkpoints.qwen import load_image_processor, load_vision_tower

IMAGE_PAD = "<|image_pad|>"


class QwenVision:
    """Runs Qwen2.5-VL on text with one image: vision tower -> image embeddings in place of the pads -> decoder."""

    def __init__(self, config, tower, decoder, image_processor):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        # transformers' own multimodal forward (placeholder scatter, 3D RoPE positions), on our two loaded parts:
        # the shell is built on meta and both its submodules are replaced, so it holds no weights of its own.
        with torch.device("meta"):
            model = Qwen2_5_VLModel(config)
        model.visual, model.language_model = tower, decoder
        self.model, self.image_processor = model.eval(), image_processor
        self.image_token_id = config.image_token_id

    @classmethod
    def from_pretrained(cls, folder: Path, decoder, dtype: torch.dtype, device: torch.device) -> "QwenVision":
        folder = Path(folder)
        config, tower = load_vision_tower(folder / "text_encoder", dtype, device)
        return cls(config, tower, decoder, load_image_processor(folder / "tokenizer"))

    @property
    def tower(self):
        return self.model.visual

    def inputs(self, tokenizer, text: str, image) -> dict:
        """Model inputs for one text holding one `<|image_pad|>` and its image, as Qwen2VLProcessor builds them."""
        if text.count(IMAGE_PAD) != 1:
            raise ValueError(f"expected one {IMAGE_PAD} in the prompt text, found {text.count(IMAGE_PAD)}")
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        pixels = self.image_processor(images=[image], return_tensors="pt")
        grid = pixels["image_grid_thw"]
        n = int(grid.prod()) // self.image_processor.merge_size**2
        ids = tokenizer(text.replace(IMAGE_PAD, IMAGE_PAD * n), return_tensors="pt")["input_ids"]
        return dict(input_ids=ids, pixel_values=pixels["pixel_values"], image_grid_thw=grid)

    @torch.inference_mode()
    def encode(self, tokenizer, texts: list[str], images: list, crop: int, budget: int):
        """Last hidden states [B, L, D] from ``crop`` on, key mask [B, L] and truncation flags.

        Each text runs on its own (no padding, as the original's batch of one), then the batch is padded at the end
        to its longest member with a False mask. A prompt whose cropped sequence exceeds ``budget`` loses prompt
        tokens from its end (the image tokens and the closing tokens stay).
        """
        device = self.tower.patch_embed.proj.weight.device
        dtype = self.tower.patch_embed.proj.weight.dtype
        rows, truncated = [], []
        for text, image in zip(texts, images):
            inp = self.inputs(tokenizer, text, image)
            ids = inp["input_ids"]
            over = ids.shape[1] - crop - budget
            truncated.append(over > 0)
            if over > 0:
                n_image = int((ids == self.image_token_id).sum())
                tail = n_image + 3  # <|vision_start|> pads <|vision_end|> <|im_end|>
                ids = torch.cat([ids[:, : ids.shape[1] - tail - over], ids[:, ids.shape[1] - tail:]], 1)
            ids = ids.to(device)
            hidden = self.model(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=inp["pixel_values"].to(device, dtype), image_grid_thw=inp["image_grid_thw"].to(device),
                mm_token_type_ids=(ids == self.image_token_id).int(),
            ).last_hidden_state
            rows.append(hidden[0, crop:])
        length = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            embeds[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return embeds, mask, truncated
