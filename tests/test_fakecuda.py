"""The CUDA path on fake CUDA (tests/fakecuda.py): every layout kind at the real model shapes, one rank of 8 at a time.

Each case builds one rank of an 8-GPU job on torch's fake process group, at the real shapes of Lite 5 s, Lite 10 s
(NABLA), Pro 5 s SD and Pro 5 s HD (NABLA) in bf16, and runs two CFG steps of the sampler (tests/fakecuda_runs.py
``check``): the device and dtype of every DiT output and of the latent, every collective's tensors on the rank's own
GPU, no device-to-host sync in the step loop, no host-to-device copy after the first step (the first may build the
once-per-shape tables of FIRST_STEP_COPIES), FlexAttention on the NABLA path with tiles inductor accepts on sm90 and
sm100.

What a CI run covers: CI_CASES, every parallel technique and every shape at least once, two visual blocks of each
model (every visual block runs the same code on the same shapes; the text blocks all run). The whole matrix, every
layout the planner accepts on 8 ranks x every shape, ranks 0 and 7, every visual block:

    K5_FAKECUDA=full .venv/bin/python -m pytest -q -n 2 tests/test_fakecuda.py -k full_matrix

(224 cases: 4 shapes x the 26 Lite or 30 Pro layouts x 2 ranks, each under 20 s; 20 minutes with -n 2 on an idle
2-core machine, all passing when this was written).
"""

import os

import pytest
import torch
from PIL import Image

from fakecuda import COLLECTIVE, D2H, H2D, FakeCuda
from fakecuda_runs import (SHAPES, TECHNIQUES, Run, accepted_layouts, build_dit, counted_forwards, expect_ok, image_vae,
                           layout_name, model_config, parallel_text, run_rank, video_vae)
from k5.engine.model.config import PRESETS
from k5.parallel.mesh import ParallelDims
from k5.parallel.plan import plan_parallel

FULL = os.environ.get("K5_FAKECUDA") == "full"

# (shape, degrees, rank, compiled): every technique and every shape at least once (test_ci_cases_cover_...).
CI_CASES = [
    ("lite-5s", {"cfg": 2, "ulysses": 4}, 7, False),
    ("lite-5s", {"dp": 2, "ring": 2, "tp": 2}, 5, False),
    ("lite-10s-nabla", {"ring": 2, "ulysses": 4}, 7, False),
    ("lite-10s-nabla", {"cfg": 2, "ring": 4}, 6, False),
    ("pro-5s-sd", {"tp": 8}, 3, False),
    ("pro-5s-sd", {"cfg": 2, "ring": 2, "tp": 2}, 7, False),
    ("pro-5s-hd", {"ulysses": 8}, 7, True),  # regional compile, as --compile runs on a GPU: flex inside the block
    ("pro-5s-hd", {"ring": 2, "ulysses": 2, "tp": 2}, 4, False),
]


def case_id(case) -> str:
    shape, degrees, rank, compiled = case
    return f"{shape}-{layout_name(degrees)}-rank{rank}" + ("-compiled" if compiled else "")


def degrees_of(degrees: dict) -> dict:
    return {name: degrees.get(name, 1) for name in TECHNIQUES}


def test_ci_cases_cover_every_technique_and_shape_with_accepted_layouts():
    for shape, degrees, _, _ in CI_CASES:
        assert degrees_of(degrees) in accepted_layouts(PRESETS[SHAPES[shape][0]]), (shape, degrees)
    assert {shape for shape, *_ in CI_CASES} == set(SHAPES)
    assert {name for _, degrees, _, _ in CI_CASES for name in degrees} == set(TECHNIQUES)


@pytest.mark.parametrize("case", CI_CASES, ids=case_id)
def test_one_rank_of_a_layout_at_real_shapes(case):
    shape, degrees, rank, compiled = case
    run = run_rank(shape, degrees, rank, compiled=compiled)
    expect_ok(run)
    assert len(run.forwards) == (2 if degrees.get("cfg") == 2 else 4)  # 2 steps, 1 or 2 branches on this rank
    collectives = run.fc.watch.of(COLLECTIVE, loop_only=True)
    assert bool(collectives) == (degrees.get("dp", 1) < 8)  # a rank alone on its item makes none


def full_matrix():
    cases = []
    for shape, (preset, *_) in SHAPES.items():
        for degrees in accepted_layouts(PRESETS[preset]):
            for rank in (0, 7):
                cases.append((shape, degrees, rank))
    return cases


if FULL:  # the whole matrix exists only when asked for (K5_FAKECUDA=full): CI collects CI_CASES, and no skip
    @pytest.mark.parametrize("case", full_matrix(), ids=lambda c: case_id((*c, False)))
    def test_full_matrix(case):
        shape, degrees, rank = case
        expect_ok(run_rank(shape, degrees, rank, depth=None))


# ---- the sampler with CFG parallel, MagCache and I2V; the decode; the image pipeline ----------------------------


def test_i2v_pipeline_with_cfg_parallel_and_magcache(tmp_path):
    """Rank 0 of cfg2 x u4 (the CFG-cond half, text source, image encoder) through Kandinsky5Pipeline.generate:
    the I2V image encoded by the HunyuanVideo VAE and broadcast, the text shared, MagCache skipping forwards of its
    branch (steps 1 and 2 of 4, the i2v-lite-5s ratios), CfgParallel exchanging velocities."""
    from k5.engine.sampling.magcache import MagCache
    from k5.engine.pipelines.video import Kandinsky5Pipeline, Request
    from k5.engine.catalogue.variants import VARIANTS
    from k5.parallel.cfg import CfgParallel
    from k5.engine.pipelines.video import Sharing
    from k5.parallel.plan import image_sharing

    Image.new("RGB", (768, 512), (200, 30, 40)).save(tmp_path / "cat.png")
    cfg = model_config("lite", 2)  # Lite I2V: the 33-channel visual_cond input
    with FakeCuda(0, 8) as fc:
        dims = fc.build_mesh(plan_parallel(8, cfg, cfg_parallel=True, ulysses=4, ring=1))
        dit, stats = build_dit(fc, cfg, dims)
        pipe = Kandinsky5Pipeline(tmp_path, dit, parallel_text(fc, cfg, dims, stats), video_vae(fc), fc.device,
                                  sharing=Sharing(image=image_sharing(dims, fc.device)))
        run = Run(fc, (1, 31, 64, 96, 16))
        counted_forwards(fc, run, pipe, steps=4)
        # Host reads once per item, outside the loop, with the values they would read: the prompt fills the text
        # budget (mask dropped), not truncated, and the image latent's header (5 dims, fp32) read back by its source.
        fc.watch.answers.update({"engine/pipelines/base.py:encode": True, "parallel/cfg.py": 0,
                                 "parallel/vae_tiles.py:broadcast_image_latent": [5, 0]})
        magcache = MagCache(VARIANTS["i2v-lite-5s"].mag_ratios)
        with torch.inference_mode():
            request = Request("a cat", image=str(tmp_path / "cat.png"), steps=4)
            result = pipe.generate(request, on_step=fc.watch.step_done, chain=[CfgParallel(dims, stats), magcache])
        run.latents = result.latents
    expect_ok(run)
    assert magcache.ran == [(0, "cond"), (3, "cond")] and magcache.skipped == [(1, "cond"), (2, "cond")]
    assert len(run.forwards) == 4  # a skipped forward still runs the text blocks and the output layer
    collectives = {e.site for e in fc.watch.of(COLLECTIVE)}
    assert {"parallel/vae_tiles.py:broadcast_image_latent", "parallel/cfg.py:__call__"} <= collectives


def test_vae_tile_plan_decode_on_one_rank_at_lite_5s():
    """Rank 7 of 8 decodes its share of the Lite 5 s tiles (132 tiles, fp16 HunyuanVideo VAE) and sends them."""
    from k5.parallel.vae_tiles import assign_tiles, decoded_shape, parallel_decode, plan_tiles

    with FakeCuda(7, 8) as fc:
        vae = video_vae(fc)
        latents = torch.randn(1, 31, 64, 96, 16, device=fc.device)
        tiles = plan_tiles(latents.shape, vae)
        with torch.inference_mode():
            frames, stats = parallel_decode(vae, latents, None, dst=0)
    assert frames is None and stats.tiles == assign_tiles(tiles, 8)[7]
    (gather,) = fc.watch.of(COLLECTIVE)
    assert gather.op == "c10d.gather_.default" and gather.devices == (fc.gpu,)
    sent = sum(torch.Size(decoded_shape(tiles[i], vae.vae, 1)).numel() for i in stats.tiles)
    assert stats.sent_bytes >= sent * 2  # fp16 tiles, padded to the largest rank's share
    assert not fc.watch.of(D2H)


def test_vae_blend_on_the_receiving_rank():
    """Rank 0 receives and blends. The library's blend loops (one slice per blended pixel row) make the real shape
    minutes long on fake tensors, so this is a small video with every kind of blend: 17 frames at 256x384, 2
    temporal windows x 2 x 2 spatial tiles."""
    from k5.parallel.vae_tiles import parallel_decode, plan_tiles

    with FakeCuda(0, 8) as fc:
        vae = video_vae(fc)
        latents = torch.randn(1, 5, 32, 48, 16, device=fc.device)
        assert len(plan_tiles(latents.shape, vae)) == 8
        with torch.inference_mode():
            frames, _ = parallel_decode(vae, latents, None, dst=0)
    assert frames.shape == (1, 17, 256, 384, 3) and frames.dtype == torch.uint8 and frames.device == fc.gpu
    (gather,) = fc.watch.of(COLLECTIVE)
    assert set(gather.devices) == {fc.gpu}


def test_image_pipeline_at_the_1024_bucket(tmp_path):
    """Image Lite T2I at 1024x1024 on rank 0 of cfg2 x r2 x u2, through ImagePipeline.generate and the FLUX decode."""
    from k5.engine.pipelines.image_request import ImageRequest
    from k5.engine.pipelines.image import ImagePipeline
    from k5.parallel.cfg import CfgParallel

    cfg = model_config("image-lite", 2)
    with FakeCuda(0, 8) as fc:
        dims = fc.build_mesh(plan_parallel(8, cfg, cfg_parallel=True, ulysses=2, ring=2))
        dit, stats = build_dit(fc, cfg, dims)
        pipe = ImagePipeline(tmp_path, dit, parallel_text(fc, cfg, dims, stats, tokens=512), image_vae(fc), fc.device)
        run = Run(fc, (1, 1, 128, 128, 16))
        counted_forwards(fc, run, pipe, steps=2)
        fc.watch.answers.update({"engine/pipelines/base.py:encode": False, "parallel/cfg.py": 0})  # a masked prompt
        with torch.inference_mode():
            result = pipe.generate(ImageRequest("a fox", height=1024, width=1024, steps=2), on_step=fc.watch.step_done,
                                   chain=[CfgParallel(dims, stats)])
            run.latents = result.latents
            image = pipe.decode(result.latents)
    expect_ok(run)
    assert image.shape == (1, 1024, 1024, 3) and image.dtype == torch.uint8 and image.device == fc.gpu


# ---- the stop agreement -------------------------------------------------------------------------------------------


def test_the_stop_agreement_makes_no_device_round_trip():
    """Supervisor.step on rank 3 of a cfg2 x u4 job whose item group is all 8 ranks: the flag travels in host memory
    over the item group's host twin; nothing is built on or read from the GPU."""
    from k5.launch.logs import Logs
    from k5.launch.signals import StopSignals
    from k5.launch.supervisor import Supervisor

    logs = Logs(3, None)
    try:
        with FakeCuda(3, 8) as fc:
            dims = fc.build_mesh(ParallelDims(cfg=2, ulysses=4))
            sup = Supervisor(3, 1, 60.0, logs, StopSignals(), fc.device)  # world 1: no store, no watchdog
            sup.set_group(dims.group("item"), 8, 0)
            fc.watch.answers["launch/supervisor.py:agree_stop"] = 0  # the group's max: nobody asked to stop
            start = len(fc.watch.events)
            with fc.watch.sampling(2) as on_step:
                for i in range(2):
                    sup.step(i)
                    on_step(i)
    finally:
        logs.close()
    events = fc.watch.events[start:]
    assert [e.kind for e in events] == [COLLECTIVE, "host read"] * 2, [str(e) for e in events]
    assert all(e.devices == (torch.device("cpu"),) for e in events)
    assert not fc.watch.of(H2D) and not fc.watch.of(D2H)


def test_an_nccl_item_group_gets_a_gloo_twin_for_the_agreement(monkeypatch):
    """On NCCL (which takes CUDA tensors only) the agreement's group is a gloo group of the same ranks, created by
    its members alone, with the job's timeout."""
    from datetime import timedelta

    import torch.distributed as dist

    from k5.launch import supervisor

    made = []
    monkeypatch.setattr(dist, "get_backend", lambda group: "nccl" if group == "item" else "gloo")
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [4, 5, 6, 7])
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: made.append((a, k)) or "twin")
    assert supervisor.host_group("item", 90.0) == "twin"
    assert made == [(([4, 5, 6, 7],), {"backend": "gloo", "timeout": timedelta(seconds=90.0),
                                       "use_local_synchronization": True})]
    assert supervisor.host_group("gloo group", 90.0) == "gloo group" and len(made) == 1
