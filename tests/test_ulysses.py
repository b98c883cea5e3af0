import torch

from distributed import run_distributed
from k5.kernels.attention import dense_attention
from k5.parallel.comm_stats import CommStats
from k5.parallel.mesh import ParallelDims
from k5.parallel.ulysses import out_to_sequence, qkv_to_heads
from numerics import rel_err

B, S, H, D = 2, 96, 4, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, S, H, D, generator=g) for _ in range(3)]


def _shards(rank, world_size, x):
    n = x.shape[1] // world_size
    return x[:, rank * n : (rank + 1) * n]


def _ulysses_worker(rank, world_size, q, k, v):
    dims = ParallelDims(ulysses=world_size)
    dims.build_mesh("cpu")
    stats = CommStats()
    ql, kl, vl = (_shards(rank, world_size, x) for x in (q, k, v))
    qh, kh, vh = qkv_to_heads(ql, kl, vl, dims.ulysses_group, stats)
    in_bytes = stats.bytes["all_to_all"]
    back = out_to_sequence(qh, dims.ulysses_group, stats)
    out = out_to_sequence(dense_attention(qh, kh, vh)[0], dims.ulysses_group)
    return dict(heads=(qh, kh, vh), back=back, out=out, in_bytes=in_bytes, summary=stats.summary())


def test_ulysses_all_to_all_layout_and_bytes():
    q, k, v = _inputs()
    U = 2
    res = run_distributed(_ulysses_worker, U, q, k, v)
    Hl, S_l = H // U, S // U
    for u, r in enumerate(res):
        # Rank u holds the whole sequence for heads [u*H/U, (u+1)*H/U): a pure permutation, so exact.
        for got, full in zip(r["heads"], (q, k, v)):
            assert torch.equal(got, full[:, :, u * Hl : (u + 1) * Hl])
        assert torch.equal(r["back"], _shards(u, U, q))
        # One packed q/k/v all-to-all in, one out; each sends (U-1)/U of its buffer, fp32.
        one = B * S_l * H * D * 4
        assert r["in_bytes"] == 3 * one * (U - 1) // U
        assert r["summary"] == {"all_to_all": {"bytes": 4 * one * (U - 1) // U, "calls": 2}}
    ref = dense_attention(q, k, v)[0]
    out = torch.cat([r["out"] for r in res], 1)
    assert rel_err(out, ref) <= 1e-4


class _LocalAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return dense_attention(q, k, v)[0]


def _deepspeed_worker(rank, world_size, q, k, v):
    # DistributedAttention talks through deepspeed.comm, whose backend object (cdb) normally comes from
    # deepspeed.init_distributed -> TorchBackend.__init__, which JIT-builds a shared-memory all-reduce op (~34 s)
    # that this test never uses. The TorchBackend methods DistributedAttention needs (get_world_size,
    # all_to_all_single, is_initialized) only forward to torch.distributed, so an instance without __init__ is
    # DeepSpeed's own layout code running over our gloo group.
    import deepspeed.comm.comm as ds_comm
    from deepspeed.comm.torch import TorchBackend
    from deepspeed.sequence.layer import DistributedAttention

    if ds_comm.cdb is None:
        ds_comm.cdb = TorchBackend.__new__(TorchBackend)
    dims = ParallelDims(ulysses=world_size)
    dims.build_mesh("cpu")
    ql, kl, vl = (_shards(rank, world_size, x) for x in (q, k, v))
    theirs = DistributedAttention(_LocalAttention(), dims.ulysses_group, scatter_idx=2, gather_idx=1)
    ds_out = theirs(ql, kl, vl, batch_dim_idx=0)
    qh, kh, vh = qkv_to_heads(ql, kl, vl, dims.ulysses_group)
    our_out = out_to_sequence(_LocalAttention()(qh, kh, vh), dims.ulysses_group)
    return ds_out, our_out


def test_ulysses_matches_deepspeed_distributed_attention():
    q, k, v = _inputs()
    res = run_distributed(_deepspeed_worker, 2, q, k, v, env={"LOCAL_SIZE": "2"})
    ref = dense_attention(q, k, v)[0]
    for rank, (ds_out, our_out) in enumerate(res):
        assert ds_out.shape == our_out.shape == (B, S // 2, H, D)
        assert rel_err(our_out, ds_out) <= 1e-4
        assert rel_err(our_out, _shards(rank, 2, ref)) <= 1e-4


def test_comm_stats_steps_and_reset():
    stats = CommStats()
    buf = torch.zeros(4, 10)  # 160 bytes
    stats.all_to_all(buf, 4)  # keeps 1/4 local: 120 bytes leave
    stats.all_gather(torch.zeros(5), 3)  # 20-byte chunk to 2 peers: 40
    stats.p2p_ring(buf)
    stats.p2p_ring(buf)
    assert stats.total_bytes == 120 + 40 + 320
    step = stats.end_step()
    assert step == {
        "all_gather": {"bytes": 40, "calls": 1},
        "all_to_all": {"bytes": 120, "calls": 1},
        "p2p_ring": {"bytes": 320, "calls": 2},
    }
    assert stats.summary() == {} and stats.steps == [step]
    stats.all_to_all(buf, 2)
    stats.reset()
    assert stats.total_bytes == 0 and stats.format() == "no communication"
