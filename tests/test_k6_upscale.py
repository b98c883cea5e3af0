"""The super-resolution stage (engine/pipelines/k6_sr.py) against diffusers' Kandinsky6SRPipeline on the tiny SR
checkpoint (engine/catalogue/k6_tiny.py, kind "sr": both load the same folder), fp32: the upscaled video within 1e-4
relative before the 8-bit rounding, and the uint8 frames within one level.

A 64x128 video: pre-upscaled 1.125x to 64x144, three overlapping 64x64 tiles, each refined at the trained 128x128
and blended into 128x288. One deliberate difference, handed over as in tests/test_k6_sr.py: diffusers' NABLA goes
through flex attention, which on the CPU without torch.compile computes dense attention; its kernel call is replaced
by a dense attention masked with its own selected tiles.

The tiles dealt over ranks (each rank's canvas of its own tiles, summed) equal the one-process canvas: checked here
with the split done in one process (rank r's tiles r, r + n, ...), and over real processes in
tests/test_k6_generate.py.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusers.models.transformers.transformer_kandinsky6_sr as reference_module
from diffusers import Kandinsky6SRPipeline
from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.engine.pipelines.k6_sr import SRStage
from numerics import rel_err
from test_k6_sr import tiles_of

TOL = 1e-4


@pytest.fixture
def masked_reference_kernel(monkeypatch):
    def dense_over_tiles(query, key, value, attn_mask=None, backend=None, parallel_config=None):
        tokens = tiles_of(attn_mask).repeat_interleave(64, -1).repeat_interleave(64, -2)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=tokens)
        return out.transpose(1, 2)

    monkeypatch.setattr(reference_module, "dispatch_attention_fn", dense_over_tiles)
    monkeypatch.setattr(reference_module, "_warn_uncompiled_flex_attention", lambda: None)


@pytest.fixture(scope="module")
def stage():
    return SRStage.from_pretrained(k6_tiny_checkpoint(kind="sr"), torch.float32)


def frames():
    rng = np.random.default_rng(3)
    return torch.from_numpy((rng.random((5, 64, 128, 3)) * 255).astype(np.uint8))


@torch.no_grad()
def test_upscale_matches_diffusers(stage, masked_reference_kernel):
    video = frames()
    plan = stage.plan(64, 128)
    assert plan.size == (64, 144) and plan.out_size == (128, 288) and len(plan.grid) == 3
    acc = stage.canvas(stage.to_input(video, plan), plan, 5, range(len(plan.grid)))
    ours = (acc / stage.weights(plan)).clamp(-1, 1)
    pipe = Kandinsky6SRPipeline.from_pretrained(stage.root, torch_dtype=torch.float32)
    theirs = pipe(video=video.permute(0, 3, 1, 2).float() / 255.0, resolution_scale=2.25, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(5), output_type="pt").frames  # [1, F, 3, H, W] in [0, 1]
    theirs = theirs.permute(0, 2, 1, 3, 4) * 2 - 1
    assert ours.shape == theirs.shape == (1, 3, 5, 128, 288)
    assert rel_err(ours, theirs) < TOL
    mine = stage.finish(acc, plan)
    assert mine.shape == (5, 128, 288, 3)
    ref8 = ((theirs[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0) * 255).round().to(torch.uint8)
    assert (mine.int() - ref8.int()).abs().max() <= 1


@torch.no_grad()
def test_tiles_dealt_over_ranks_sum_to_the_one_process_canvas(stage):
    video = frames()
    plan = stage.plan(64, 128)
    x = stage.to_input(video, plan)
    whole = stage.canvas(x, plan, 5, range(3))
    parts = [stage.canvas(x, plan, 5, range(r, 3, 2)) for r in range(2)]
    assert rel_err(parts[0] + parts[1], whole) < 1e-6


def test_too_small_a_video_is_refused(stage):
    with pytest.raises(ValueError, match="need at least"):
        stage.plan(32, 128)
