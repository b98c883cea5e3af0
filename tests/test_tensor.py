"""The tensor-parallel DiT, loaded shard-wise from a checkpoint, vs the single-process DiT (fp32, rel err <= 1e-4)."""

import pytest
import torch

from distributed import run_distributed
from k5.kernels.nabla import NablaSpec
from k5.parallel.mesh import ParallelDims
from k5.parallel.sequence import apply_sequence_parallel
from k5.parallel.tensor import load_rank_dit, parameter_bytes
from numerics import rel_err
from test_sharded_load import CFG, build_model, write_checkpoint

SPEC = NablaSpec(P=0.4, wT=1, wH=1, wW=1)  # sparse enough that NABLA differs from dense
DENSE_SHAPE, NABLA_SHAPE = (3, 6, 10), (4, 16, 32)  # 45 tokens (padded under SP); 8 NABLA blocks


def make_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    T, H, W = shape
    mask = torch.tensor([[True] * 4 + [False] * 2])
    return (torch.randn(1, T, H, W, CFG.in_channels, generator=g), torch.randn(1, 6, CFG.in_text_dim, generator=g),
            torch.randn(1, CFG.in_text_dim2, generator=g), torch.tensor([700.0]), mask)


def forward(model, inputs, nabla):
    x, text, pooled, t, mask = inputs
    model.visual_attention.nabla = SPEC if nabla else None
    with torch.no_grad():
        return model(x, text, pooled, t, scale_factor=(1.0, 2.0, 2.0), text_mask=mask)


def _tp_worker(rank, world_size, path, tp, ulysses, ring):
    dims = ParallelDims(tp=tp, ulysses=ulysses, ring=ring)
    dims.build_mesh("cpu")
    model, stats = load_rank_dit(path, dims, torch.float32)
    if dims.sp_size > 1:
        apply_sequence_parallel(model, dims, stats)
    dense = forward(model, make_inputs(DENSE_SHAPE, 1), nabla=False)
    calls = dict(stats.calls)
    nabla = forward(model, make_inputs(NABLA_SHAPE, 2), nabla=True)
    return dense, nabla, calls, parameter_bytes(model)


@pytest.mark.parametrize("tp, ulysses, ring", [(2, 1, 1), (2, 2, 1)])
def test_tensor_parallel_dit_equals_single_process(tmp_path, tp, ulysses, ring):
    model = build_model()
    path = write_checkpoint(model.state_dict(), CFG, tmp_path, "diffusers")
    want_dense = forward(model, make_inputs(DENSE_SHAPE, 1), nabla=False)
    want_nabla = forward(model, make_inputs(NABLA_SHAPE, 2), nabla=True)
    full_bytes = parameter_bytes(model)["total"]
    results = run_distributed(_tp_worker, tp * ulysses * ring, tmp_path, tp, ulysses, ring)
    for dense, nabla, calls, nbytes in results:
        assert rel_err(dense, want_dense) <= 1e-4
        assert rel_err(nabla, want_nabla) <= 1e-4
        # Per forward: 3 row-wise all-reduces per visual block (self-attn, cross-attn, FFN), 2 per text block.
        assert calls["all_reduce"] == 3 * CFG.num_visual_blocks + 2 * CFG.num_text_blocks
        # One modulation all-gather per block and one for the output layer (+ the SP output gather, if any).
        assert calls["all_gather"] == CFG.num_visual_blocks + CFG.num_text_blocks + 1 + (ulysses * ring > 1)
        assert nbytes["split"] > 0 and nbytes["total"] < 0.6 * full_bytes
    assert rel_err(forward(model, make_inputs(NABLA_SHAPE, 2), nabla=False), want_nabla) > 1e-3
