import pytest
import torch.distributed as dist

from distributed import run_distributed
from k5.parallel.mesh import ParallelDims


def test_validate_accepts_matching_product():
    ParallelDims(ring=2, ulysses=2).validate(4)
    ParallelDims(dp=2, cfg=2, ring=1, ulysses=2, tp=1).validate(8)


def test_validate_lists_valid_choices():
    with pytest.raises(ValueError) as e:
        ParallelDims(ring=2, ulysses=3).validate(4)
    msg = str(e.value)
    # Worked out by hand: ulysses x ring with product 4.
    assert "multiply to 6" in msg and "world size is 4" in msg
    assert "--ulysses-degree 4 --ring-degree 1;" in msg
    assert "--ulysses-degree 2 --ring-degree 2" in msg
    assert "--ulysses-degree 1 --ring-degree 4" in msg


def test_validate_keeps_other_degrees_when_they_fit():
    with pytest.raises(ValueError, match="--ulysses-degree 2 --ring-degree 1 --cfg-degree 2") as e:
        ParallelDims(cfg=2, ulysses=4).validate(4)
    assert "--ulysses-degree 1 --ring-degree 2 --cfg-degree 2" in str(e.value)


@pytest.mark.parametrize("kwargs", [{"ring": 0}, {"ulysses": -1}, {"tp": 1.5}, {"cfg": 3}])
def test_bad_degrees_rejected(kwargs):
    with pytest.raises(ValueError):
        ParallelDims(**kwargs)


def test_check_heads_message_suggests_splits():
    ParallelDims(ulysses=4, ring=2).check_heads(32)
    with pytest.raises(ValueError) as e:
        ParallelDims(ulysses=8).check_heads(28)
    # 28 = 2^2 * 7: of the ulysses degrees dividing 8, only 4, 2, 1 divide 28.
    assert str(e.value) == (
        "28 heads do not divide by ulysses degree 8; use --ulysses-degree 4 --ring-degree 2 or "
        "--ulysses-degree 2 --ring-degree 4 or --ulysses-degree 1 --ring-degree 8 (ulysses x ring = 8)"
    )


def test_groups_need_a_mesh():
    with pytest.raises(RuntimeError, match="build_mesh"):
        ParallelDims().ulysses_group


def _membership(rank, world_size):
    out = {}
    for name, dims in {
        "ring2_ulysses2": ParallelDims(ring=2, ulysses=2),
        "ulysses2_tp2": ParallelDims(ulysses=2, tp=2),
        "cfg2_ulysses2": ParallelDims(cfg=2, ulysses=2),
    }.items():
        dims.build_mesh("cpu")
        groups = {d: dist.get_process_group_ranks(dims.group(d)) for d in ("dp", "cfg", "ring", "ulysses", "tp", "sp")}
        ranks = {d: dims.rank(d) for d in ("dp", "cfg", "ring", "ulysses", "tp", "sp")}
        out[name] = (groups, ranks)
    try:
        ParallelDims(ulysses=3).build_mesh("cpu")
    except ValueError as e:
        out["error"] = str(e)
    return out


def test_group_membership_over_gloo():
    res = run_distributed(_membership, 4)
    for rank, r in enumerate(res):
        # ring 2 x ulysses 2: Ulysses groups are consecutive ranks, ring groups stride by the ulysses degree,
        # and the flattened SP group orders ranks as ring_rank * 2 + ulysses_rank.
        groups, ranks = r["ring2_ulysses2"]
        assert groups["ulysses"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert groups["ring"] == [rank % 2, rank % 2 + 2]
        assert groups["sp"] == [0, 1, 2, 3]
        assert groups["tp"] == groups["dp"] == groups["cfg"] == [rank]
        assert (ranks["ring"], ranks["ulysses"]) == (rank // 2, rank % 2)
        assert ranks["sp"] == ranks["ring"] * 2 + ranks["ulysses"] == rank
        # ulysses 2 x tp 2: tp is innermost (consecutive), ulysses strides by 2.
        groups, ranks = r["ulysses2_tp2"]
        assert groups["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert groups["ulysses"] == groups["sp"] == [rank % 2, rank % 2 + 2]
        assert (ranks["ulysses"], ranks["tp"]) == (rank // 2, rank % 2)
        # cfg 2 x ulysses 2: each CFG branch owns a consecutive pair.
        groups, ranks = r["cfg2_ulysses2"]
        assert groups["ulysses"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert groups["cfg"] == [rank % 2, rank % 2 + 2]
        assert ranks["cfg"] == rank // 2
        assert "multiply to 3" in r["error"] and "world size is 4" in r["error"]
