"""Image Lite under the parallel layouts.

DiT level: one-frame (image) token grids under sequence parallelism: the tiny Image Lite DiT under Ulysses 2 and
ring 2 over gloo gives the single-process velocity (fp32, relative error <= 1e-4; measured <= 2.5e-7).

Pipeline level (k5.parallel.plan.setup_parallel, the real tiny text encoders, VAE and sampler): I2I under Ulysses 2
and under CFG parallel gives the latents of ImagePipeline.generate in one process (fp32, relative error <= 1e-4), at
the 640x1408 bucket: 40 x 88 = 3520 tokens = 55 blocks of 64, so two sequence ranks pad one block. The source image
is VAE-encoded once per item (on the item group's rank 0) and each cfg half encodes only its own prompt with the
source image. The CLI tests (test_generate_image.py) run T2I and I2I under Ulysses 2, ring 2, TP 2 and CFG x 2.

Grids: 1x64x64 latents -> 1x32x32 patches = 1024 tokens (16 blocks of 64: even shards) and the 640x1408 bucket's
1x80x176 latents -> 40x88 = 3520 tokens = 55 blocks (odd: one pad block under 2 sequence ranks). The text is padded
with a key mask, as the T2I budget pads it.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from distributed import run_distributed
from k5.engine.pipelines.image_request import ImageRequest
from k5.engine.pipelines.image import ImagePipeline
from k5.engine.sampling.magcache import MagCache
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.parallel.layout import SequenceLayout
from k5.parallel.mesh import ParallelDims
from k5.parallel.plan import build_parallel, plan_parallel, setup_parallel
from k5.parallel.sequence import apply_sequence_parallel
from k5.parallel.tensor import load_rank_dit
from k5.engine.checkpoints.dit import load_dit, locate
from numerics import rel_err

GRIDS = [(64, 64), (80, 176)]


def make_inputs(latent_hw, seed):
    g = torch.Generator().manual_seed(seed)
    H, W = latent_hw
    mask = torch.tensor([[True] * 7 + [False] * 3])
    return (torch.randn(1, 1, H, W, 33, generator=g), torch.randn(1, 10, 32, generator=g),
            torch.randn(1, 24, generator=g), torch.tensor([850.0]), mask)


def velocities(model):
    out = []
    for i, grid in enumerate(GRIDS):
        x, text, pooled, t, mask = make_inputs(grid, i)
        with torch.no_grad():
            out.append(model(x, text, pooled, t, scale_factor=(1.0, 1.0, 1.0), text_mask=mask))
    return out


def _worker(rank, world_size, path, ulysses, ring, tp):
    dims = ParallelDims(ulysses=ulysses, ring=ring, tp=tp)
    dims.build_mesh("cpu")
    model, stats = load_rank_dit(path, dims, torch.float32)
    if dims.sp_size > 1:
        apply_sequence_parallel(model, dims, stats)
    return velocities(model), stats.summary()


def test_one_frame_layouts_pad_whole_blocks():
    even, odd = SequenceLayout(32 * 32, 2), SequenceLayout(40 * 88, 2)
    assert (even.num_blocks, even.shard_len, even.pad) == (16, 512, 0)
    assert (odd.num_blocks, odd.padded_blocks, odd.shard_len, odd.pad) == (55, 56, 1792, 64)


@pytest.mark.parametrize("ulysses, ring, tp", [(2, 1, 1), (1, 2, 1)])
def test_image_dit_parallel_equals_single_process(ulysses, ring, tp):
    path = tiny_checkpoint(kind="i2i")
    want = velocities(load_dit(path, dtype=torch.float32))
    for got, summary in run_distributed(_worker, ulysses * ring * tp, str(path), ulysses, ring, tp):
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel_err(g, w) <= 1e-4
        assert summary  # the layout did communicate


# ---- the pipeline under setup_parallel ------------------------------------------------------------------------------

REQUEST = dict(prompt="a lighthouse on a cliff", steps=2, seed=11, height=640, width=1408)


def _source(tmp_path):
    # 30 x 66 pixels: aspect 0.4545, nearest bucket 640x1408 (0.4545 exactly)
    path = tmp_path / "source.png"
    Image.fromarray((np.random.default_rng(2).random((30, 66, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def _pipeline_worker(rank, world_size, root, degrees, request):
    par = setup_parallel(root, dtype=torch.float32, device="cpu", **degrees)
    calls = []
    encode = par.pipeline.vae.encode
    par.pipeline.vae.encode = lambda *a, **kw: calls.append(1) or encode(*a, **kw)
    texts = []
    shared = getattr(par.pipeline.text, "inner", par.pipeline.text)  # SharedText, under BranchText with cfg 2
    if shared.encoder is not None:
        inner = shared.encoder.encode
        shared.encoder.encode = lambda prompts, **kw: texts.append((list(prompts), kw.get("images") is not None)) \
            or inner(prompts, **kw)
    result = par.pipeline.generate(ImageRequest(**request), chain=par.stages)
    return dict(latents=result.latents, encodes=len(calls), texts=texts, pipeline=type(par.pipeline).__name__,
                describe=par.describe(), sent=par.stats.summary(), split=par.parameter_bytes["split"])


# Two processes each (every process imports diffusers and transformers and loads the tiny models): I2I under
# Ulysses 2 (the edit prompt's embeddings, unpadded and as long as its image makes them, broadcast by the text
# source) and under CFG parallel (each half encodes its own prompt with the source image). Both share the source
# latent over the item group. T2I takes the same paths with the plain image template.
@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(cfg_parallel=True)], ids=["ulysses2", "cfg2"])
def test_i2i_under_setup_parallel_equals_single_process(tmp_path, degrees):
    root = tiny_checkpoint(kind="i2i")
    request = dict(REQUEST, image=_source(tmp_path))
    want = ImagePipeline.from_pretrained(root, torch.float32).generate(ImageRequest(**request)).latents
    assert want.shape == (1, 1, 80, 176, 16)
    results = run_distributed(_pipeline_worker, 2, str(root), degrees, request)
    for r in results:
        assert r["pipeline"] == "ImagePipeline"
        assert rel_err(r["latents"], want) <= 1e-4
    assert [r["encodes"] for r in results] == [1, 0]  # the item group's rank 0 VAE-encodes the source
    texts = [r["texts"] for r in results]
    if "ulysses" in degrees:
        assert all("all_to_all" in r["sent"] for r in results)
        # one text source for the replica: prompt and negative prompt together, each with the source image
        assert texts == [[([request["prompt"], ""], True)], []]
        assert results[1]["sent"]["all_to_all"]["bytes"] > 0
    else:
        assert "cfg 2" in results[0]["describe"] and all("all_gather" in r["sent"] for r in results)
        assert texts == [[([request["prompt"]], True)], [([""], True)]]  # cfg half 0: cond, half 1: uncond


def test_one_process_builds_the_image_pipeline_and_magcache_is_refused():
    root = tiny_checkpoint(kind="t2i")
    dims = plan_parallel(1, locate(root).config)
    s = build_parallel(root, dims, dtype=torch.float32, device="cpu")
    assert isinstance(s.pipeline, ImagePipeline) and s.stages == [] and s.stats is None
    with pytest.raises(ValueError, match="MagCache has no ratios for Image Lite .*drop --magcache"):
        s.pipeline.generate(ImageRequest(**REQUEST), chain=[MagCache([1.0] * 98)])
