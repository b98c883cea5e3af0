"""One-frame (image) token grids under sequence parallelism: the tiny Image Lite DiT under Ulysses 2 and ring 2 over
gloo gives the single-process velocity (fp32, relative error <= 1e-4; measured <= 2.5e-7). Tensor parallelism does
not depend on the token grid; the CLI tests run images under it.

Grids: 1x64x64 latents -> 1x32x32 patches = 1024 tokens (16 blocks of 64: even shards) and the 640x1408 bucket's
1x80x176 latents -> 40x88 = 3520 tokens = 55 blocks (odd: one pad block under 2 sequence ranks). The text is padded
with a key mask, as the T2I budget pads it.
"""

import pytest
import torch

from distributed import run_distributed
from k5.engine.dit import Kandinsky5DiT
from k5.engine.tiny import tiny_checkpoint
from k5.parallel.layout import SequenceLayout
from k5.parallel.mesh import ParallelDims
from k5.parallel.sequence import apply_sequence_parallel
from k5.parallel.tensor import load_dit
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
    model, stats = load_dit(path, dims, torch.float32)
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
    want = velocities(Kandinsky5DiT.from_pretrained(path, torch_dtype=torch.float32))
    for got, summary in run_distributed(_worker, ulysses * ring * tp, str(path), ulysses, ring, tp):
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel_err(g, w) <= 1e-4
        assert summary  # the layout did communicate
