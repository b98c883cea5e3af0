"""Text conditioning of Kandinsky 6: the Kandinsky 5 encoders with a 1024-token budget.

Kandinsky 6 keeps Kandinsky 5's text path (diffusers' Kandinsky6TI2VAPipeline, checked in tests/test_k6_text.py):
the same video template byte for byte ("promt", "scren"), cropped at the same 129 template tokens, Qwen2.5-VL's
last hidden state (after its final RMSNorm) and CLIP's pooled vector of the raw prompt (77 tokens); the same default
negative prompt. What changes is the budget, 1024 prompt tokens instead of 256, padded with a key mask. Both streams'
text branches take these same embeddings: the DiT gives each stream its own embedding layers and text blocks.

The padding is trimmed before the DiT: with right padding and a key mask a padded token is never a key, and RoPE
gives the real tokens the same positions with or without the pad after them, so trimming the pad that every prompt
of a batch shares changes no output (the reference computes all 1024 positions). A batch whose prompts are all
real up to the end needs no mask at all, and gets none (as in the reference, so every attention kernel stays
available).
"""

from __future__ import annotations

from torch import Tensor

from k5.engine.sampling.chain import Conditioning
from k5.engine.encoders.text import VIDEO_PROMPT_TEMPLATE, PromptFormat, TextEmbeds, TextEncoder

MAX_PROMPT_TOKENS = 1024
K6_PROMPT = PromptFormat("k6-video", VIDEO_PROMPT_TEMPLATE, None, MAX_PROMPT_TOKENS)


def trimmed(embeds: Tensor, mask: Tensor, pooled: Tensor) -> Conditioning:
    """The conditioning of a batch [B, L, D] with key mask [B, L]: pad shared by all rows cut, mask None if none
    is left. Keeps at least one token (a prompt always has one: the template's closing tokens)."""
    keep = max(1, int(mask.sum(-1).max()))
    embeds, mask = embeds[:, :keep], mask[:, :keep]
    return Conditioning(embeds, None if bool(mask.all()) else mask, pooled)


def conditionings(text: TextEmbeds) -> list[Conditioning]:
    """One conditioning per prompt of an encoded batch, each trimmed to its own length (so none needs a mask)."""
    return [trimmed(text.embeds[i : i + 1], text.mask[i : i + 1], text.pooled[i : i + 1])
            for i in range(text.embeds.shape[0])]


def encode(encoder: TextEncoder, prompts: list[str]) -> tuple[list[Conditioning], list[bool]]:
    """Each prompt's conditioning, and whether it exceeded the 1024-token budget (cut at its end)."""
    text = encoder.encode(list(prompts), fmt=K6_PROMPT)  # keyword: SharedText / BranchText pass it on
    return conditionings(text), text.truncated
