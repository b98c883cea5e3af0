"""Kandinsky 6 text conditioning against diffusers' Kandinsky6TI2VAPipeline.encode_prompt on tiny-k6 (fp32).

The reference pads every prompt to 1024 tokens after the 129-token template crop and passes a key mask (None when
nothing is padded); ours trims the padding. Compared: the real tokens' embeddings (ours: Qwen2.5-VL's text decoder
alone, fed input ids only; diffusers: the whole model with the attention mask: the same numbers for right-padded
real tokens, measured 0), the CLIP vector, the number of real tokens, truncation at 1024, and that the trimming does
not change the DiT's output (the reference's padded text with its mask against ours: within 1e-5, measured 0).
"""

import pytest
import torch
from diffusers import Kandinsky6TI2VAPipeline

from k5.engine.encoders import k6_text
from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.engine.encoders.text import DEFAULT_NEGATIVE_PROMPT, TextEncoder
from k5.engine.checkpoints.dit import load_k6_dit
from numerics import rel_err


@pytest.fixture(scope="module")
def root():
    return k6_tiny_checkpoint(kind="sft")


@pytest.fixture(scope="module")
def encoder(root):
    return TextEncoder.from_pretrained(root, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(root):
    return Kandinsky6TI2VAPipeline.from_pretrained(root, torch_dtype=torch.float32)


def reference(pipe, prompts):
    embeds, pooled, mask, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                  device=torch.device("cpu"), dtype=torch.float32)
    return embeds, pooled, mask


@torch.no_grad()
def test_embeddings_match_diffusers(pipe, encoder):
    prompts = ["a red fox barks in the snow", DEFAULT_NEGATIVE_PROMPT]
    want, want_pooled, want_mask = reference(pipe, prompts)
    assert want.shape[1] == k6_text.MAX_PROMPT_TOKENS
    conds, truncated = k6_text.encode(encoder, prompts)
    assert truncated == [False, False]
    for i, cond in enumerate(conds):
        n = int(want_mask[i].sum())
        assert cond.mask is None and cond.embeds.shape == (1, n, want.shape[-1])
        assert rel_err(cond.embeds, want[i : i + 1, :n]) <= 1e-6
        assert rel_err(cond.pooled, want_pooled[i : i + 1]) <= 1e-6
    # The two prompts have different lengths, so the reference pads both within its 1024 tokens.
    assert conds[0].embeds.shape[1] != conds[1].embeds.shape[1]


@torch.no_grad()
def test_batch_keeps_a_mask_for_the_shorter_prompt(encoder):
    text = encoder.encode(["a fox", "a fox runs through the green grass in the park"], k6_text.K6_PROMPT)
    cond = k6_text.trimmed(text.embeds, text.mask, text.pooled)
    lengths = text.mask.sum(-1)
    assert cond.embeds.shape[1] == int(lengths.max()) < k6_text.MAX_PROMPT_TOKENS
    assert cond.mask is not None and cond.mask.sum(-1).tolist() == lengths.tolist()


@torch.no_grad()
def test_long_prompt_is_cut_at_1024_tokens_as_the_reference(pipe, encoder):
    prompt = "the cat walks on the green grass " * 200
    want, _, want_mask = reference(pipe, [prompt])
    (cond,), truncated = k6_text.encode(encoder, [prompt])
    assert truncated == [True] and want_mask is None  # nothing left to pad
    assert cond.embeds.shape == want.shape == (1, 1024, want.shape[-1])
    assert rel_err(cond.embeds, want) <= 1e-6


@torch.no_grad()
def test_trimming_does_not_change_the_dit(root, pipe, encoder):
    """The DiT on the reference's padded text with its key mask equals the DiT on our trimmed text."""
    dit = load_k6_dit(root, dtype=torch.float32)
    want, pooled, mask = reference(pipe, ["a red fox barks in the snow"])
    (cond,), _ = k6_text.encode(encoder, ["a red fox barks in the snow"])
    g = torch.Generator().manual_seed(0)
    x, audio, t = torch.randn(1, 2, 8, 8, 33, generator=g), torch.randn(1, 9, 40, generator=g), torch.tensor([700.0])
    padded = dit(x, audio, want, pooled, t, text_mask=mask)
    ours = dit(x, audio, cond.embeds, cond.pooled, t, text_mask=cond.mask)
    unmasked = dit(x, audio, want, pooled, t)
    for p, o, u in zip(padded, ours, unmasked):
        assert rel_err(o, p) <= 1e-5
        assert rel_err(u, p) > 1e-3  # the pad would matter without its mask
