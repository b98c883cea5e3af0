"""k5.parallel.plan: degrees from the flags (checked once, LayoutError carrying what would fit) and the one-process
build. The multi-process build runs in test_parallel_generate.py (setup_parallel) and test_generate_parallel.py
(the CLI); the expected degrees and choices here are worked out by hand in the comments."""

import pytest
import torch

from k5.engine.model.config import DiTConfig
from k5.engine.model.dit import LocalTokens
from k5.engine.pipelines.video import Kandinsky5Pipeline
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.parallel.cfg import check_cfg_parallel
from k5.parallel.mesh import LayoutError, ParallelDims
from k5.parallel.plan import build_parallel, check_layout, check_request, plan_layout, plan_parallel
from k5.engine.checkpoints.dit import locate
from test_sharded_load import CFG  # 4 heads, ff_dim 128


def test_plan_parallel():
    lite = DiTConfig()  # 28 heads
    d = plan_parallel(8, lite, tp=2, cfg_parallel=True)
    assert (d.dp, d.cfg, d.ring, d.ulysses, d.tp) == (1, 2, 1, 2, 2)
    d = plan_parallel(8, lite, tp=2, ulysses=2, ring=1)  # dp inferred from what is left
    assert (d.dp, d.cfg, d.ring, d.ulysses, d.tp) == (2, 1, 1, 2, 2)
    d = plan_parallel(8, CFG, tp=4, cfg_parallel=True)  # 1 head per tp rank: no Ulysses, ring instead
    assert (d.cfg, d.ring, d.ulysses, d.tp) == (2, 1, 1, 4)
    with pytest.raises(ValueError, match="parallel degrees multiply to 12 .* but the world size is 8; valid choices"):
        plan_parallel(8, lite, tp=2, cfg_parallel=True, ulysses=3)
    with pytest.raises(ValueError, match="with --tp-degree 2 each rank holds 14 of the 28 heads, and 14 heads do not "
                                         "divide by ulysses degree 4; use --ulysses-degree 2 --ring-degree 2"):
        plan_parallel(8, lite, tp=2, ulysses=4)
    with pytest.raises(ValueError, match="--tp-degree 8 does not divide the model's 28 heads"):
        plan_parallel(8, lite, tp=8)
    with pytest.raises(ValueError, match="--guidance-scale 1 has no unconditional pass; drop --cfg-parallel"):
        check_cfg_parallel(1.0)


def test_heads_not_divisible():
    with pytest.raises(ValueError, match="4 heads do not divide by ulysses degree 3; use --ulysses-degree 1 "
                                         "--ring-degree 3"):
        plan_layout(3, 4, ulysses=3)


def test_default_layout_prefers_ulysses():
    assert (plan_layout(8, 28).ulysses, plan_layout(8, 28).ring) == (4, 2)
    assert (plan_layout(8, 32).ulysses, plan_layout(8, 32).ring) == (8, 1)
    assert (plan_layout(3, 4).ulysses, plan_layout(3, 4).ring) == (1, 3)
    with pytest.raises(ValueError, match="world size is 4"):
        plan_layout(4, 4, ulysses=2, ring=3)


def test_tp_degree_errors():
    with pytest.raises(ValueError, match=r"--tp-degree 3 does not divide the model's 4 heads and ff_dim 128; "
                                         r"use --tp-degree 1 or 2 or 4"):
        check_layout(CFG, ParallelDims(tp=3))
    with pytest.raises(ValueError, match=r"with --tp-degree 2 each rank holds 2 of the 4 heads, and 2 heads do not "
                                         r"divide by ulysses degree 4; use --ulysses-degree 2 --ring-degree 2 or "
                                         r"--ulysses-degree 1 --ring-degree 4"):
        check_layout(CFG, ParallelDims(tp=2, ulysses=4))
    check_layout(CFG, ParallelDims(tp=2, ulysses=2))  # 1 head per Ulysses rank is fine
    check_layout(DiTConfig(), ParallelDims(tp=4, ulysses=7))  # Lite: 28 heads -> 7 per tp rank


def test_errors_are_typed_and_carry_the_choices():
    lite = DiTConfig()
    # tp 2 of 8 ranks leaves ulysses x ring = 4; 14 heads per tp rank divide by ulysses 2 and 1, not 4.
    with pytest.raises(LayoutError) as e:
        plan_parallel(8, lite, tp=2, ulysses=4)
    assert e.value.degrees == dict(dp=1, cfg=1, ring=1, ulysses=4, tp=2)
    assert e.value.choices == ["--ulysses-degree 2 --ring-degree 2", "--ulysses-degree 1 --ring-degree 4"]
    # 28 heads (4 * 7) and ff_dim 7168 (1024 * 7): every divisor of 28 divides both, 8 does not divide 28.
    with pytest.raises(LayoutError) as e:
        plan_parallel(8, lite, tp=8)
    assert e.value.choices == [f"--tp-degree {d}" for d in (1, 2, 4, 7, 14, 28)]
    # The test model: 4 heads, ff_dim 128; tp 3 divides neither.
    with pytest.raises(LayoutError) as e:
        check_layout(CFG, ParallelDims(tp=3))
    assert e.value.choices == ["--tp-degree 1", "--tp-degree 2", "--tp-degree 4"]
    # cfg 2 x ulysses 3 = 6 on 4 ranks: keeping cfg 2, ulysses x ring = 2 -> (2, 1) or (1, 2).
    with pytest.raises(LayoutError) as e:
        plan_parallel(4, CFG, cfg_parallel=True, ulysses=3, ring=1, dp=1)
    assert e.value.choices == ["--ulysses-degree 2 --ring-degree 1 --cfg-degree 2",
                               "--ulysses-degree 1 --ring-degree 2 --cfg-degree 2"]
    with pytest.raises(LayoutError):
        ParallelDims(ring=0)


def test_check_request_on_the_layout():
    check_request(ParallelDims(cfg=2), 5.0)
    check_request(ParallelDims(), 1.0)  # no CFG parallelism: a guidance scale of 1 is fine
    with pytest.raises(LayoutError, match="--guidance-scale 1 has no unconditional pass"):
        check_request(ParallelDims(cfg=2), 1.0)


def test_one_process_builds_the_plain_pipeline():
    root = tiny_checkpoint()
    dims = plan_parallel(1, locate(root).config)
    s = build_parallel(root, dims, dtype=torch.float32, device="cpu")
    assert dims.world_size == 1 and dims.mesh is None  # no process group needed
    assert isinstance(s.pipeline, Kandinsky5Pipeline) and isinstance(s.pipeline.dit.tokens, LocalTokens)
    assert s.stages == [] and s.stats is None and s.item_group is None and (s.item_rank, s.dp_rank) == (0, 0)
    assert s.parameter_bytes["split"] == 0 and s.parameter_bytes["total"] > 0
