import torch
import torch.distributed as dist

from distributed import run_distributed


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_gloo_workers_see_each_other():
    # 1 + 2 + 3 = 6, worked out by hand
    assert run_distributed(_all_reduce_rank, 3) == [6.0, 6.0, 6.0]
