"""The collective counters inside compiled blocks: no graph break, and the same numbers as eager.

A tensor-parallel and a Ulysses visual block are compiled whole (``fullgraph=True`` raises at the first graph break)
on one rank of torch's fake process group (collectives that move nothing: the counts depend on shapes only). The
byte counts are worked out by hand from the shapes and the rules of comm_stats.py.
"""

import pytest
import torch
import torch.distributed as dist

from k5.engine.model.config import DiTConfig
from k5.engine.model.dit import Kandinsky5DiT, TokenGrid
from k5.parallel.comm_stats import CommStats
from k5.parallel.mesh import ParallelDims
from k5.parallel.ring import RingCounters
from k5.parallel.sequence import apply_sequence_parallel
from k5.parallel.tensor import apply_tensor_parallel

CFG = DiTConfig(in_text_dim=24, in_text_dim2=12, time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1,
                num_visual_blocks=1, axes_dims=(4, 6, 6))  # 4 heads of 16
TOKENS = 128  # 2 blocks of 64: one per Ulysses rank


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def block_inputs(model, local_tokens):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, local_tokens, 64, generator=g)
    text, time_embed = torch.randn(1, 6, 64, generator=g), torch.randn(1, 32, generator=g)
    cos, sin = torch.randn(local_tokens, 8, generator=g), torch.randn(local_tokens, 8, generator=g)
    return x, text, time_embed, cos, sin, None, model.visual_attention, TokenGrid(1, 8, 16, fractal=False)


def run(block, args, compiled: bool, stats: CommStats) -> dict:
    torch._dynamo.reset()
    fn = torch.compile(block, backend="eager", fullgraph=True, dynamic=False) if compiled else block
    stats.reset()
    with torch.no_grad():
        fn(*args)
        fn(*args)
    return stats.summary()


def test_tensor_parallel_block_compiles_whole_and_counts_as_eager(fake_world):
    dims = ParallelDims(tp=2)
    dims.build_mesh("cpu")
    model = Kandinsky5DiT(CFG).eval()
    stats = apply_tensor_parallel(model, dims)
    args = block_inputs(model, TOKENS)
    block = model.visual_transformer_blocks[0]
    compiled = run(block, args, True, stats)
    # Two calls: 3 all-reduces of [1, 128, 64] fp32 each (2 (n-1)/n of 32 KiB = 32 KiB at n = 2) and one all-gather
    # of the modulation's half [1, 9*64/2] fp32 (1152 bytes, sent to 1 peer).
    want = {"all_gather": {"bytes": 2 * 1152, "calls": 2}, "all_reduce": {"bytes": 2 * 3 * 32768, "calls": 6}}
    assert compiled == want
    assert run(block, args, False, stats) == want


def test_ulysses_block_compiles_whole_and_counts_as_eager(fake_world):
    dims = ParallelDims(ulysses=2)
    dims.build_mesh("cpu")
    model = Kandinsky5DiT(CFG).eval()
    stats = apply_sequence_parallel(model, dims)
    model.tokens.scatter(torch.zeros(1, TOKENS, 64))  # fixes the layout: 64 tokens per rank
    args = block_inputs(model, TOKENS // 2)
    block = model.visual_transformer_blocks[0]
    compiled = run(block, args, True, stats)
    # Two calls, each: one packed q/k/v all-to-all of this rank's 64 tokens x 4 heads x 16 x 3 in fp32 (48 KiB, the
    # half for the other rank sent) and one of the output, 128 tokens x 2 heads x 16 (16 KiB, half sent).
    want = {"all_to_all": {"bytes": 2 * (24576 + 8192), "calls": 4}}
    assert compiled == want
    assert run(block, args, False, stats) == want


def test_ring_counters_count_through_the_op():
    counters = RingCounters()
    counters.count(skipped=False)
    counters.count(skipped=True)
    counters.count(skipped=False)
    assert (counters.kernel_calls, counters.skipped_steps) == (2, 1)

    def f(x, c):
        c.count(skipped=False)
        return x + 1

    torch._dynamo.reset()
    g = torch.compile(f, backend="eager", fullgraph=True)
    g(torch.ones(2), counters)
    g(torch.ones(2), counters)
    assert (counters.kernel_calls, counters.skipped_steps) == (4, 1)
