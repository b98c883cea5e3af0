"""The Kandinsky 6 DiT on the parallel layouts against the single-process DiT on tiny-k6, fp32, within 1e-5 relative
(measured 2e-7 and below: the ring's merges and the partial ``av`` attentions only change summation order).

Every layout runs, in real processes over gloo, the forwards that sampling makes: T2AV with a padded prompt, I2AV
(tail frame, token types, its RoPE positions), video with NABLA (a sparse spec, so it differs from dense), and the
video alone; the video token counts leave pad blocks (144 tokens for 2 ranks; 32 tokens: one rank holds only pad).
The replicated audio must come out bitwise the same on every rank (it is state the next step reads everywhere).
CFG x Ulysses runs the whole sampler with CFG parallelism against the sequential sampler.
"""

import pytest
import torch

from distributed import run_distributed
from k5.engine.sampling.chain import Conditioning
from k5.engine.sampling.k6_sampler import sample, tail_frame_kwargs
from k5.engine.sampling.k6_schedule import EulerSchedule
from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.kernels.nabla import NablaSpec
from k5.parallel.k6 import CfgParallel, apply_sequence_parallel, load_rank_k6_dit
from k5.parallel.mesh import LayoutError, ParallelDims
from k5.engine.checkpoints.dit import load_k6_dit
from numerics import rel_err

TOL = 1e-5
SPEC = NablaSpec(P=0.4, wT=1, wH=1, wW=1)


@pytest.fixture(scope="module")
def root():
    return k6_tiny_checkpoint(kind="sft")


def text(seed, n=6, real=4):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(n) < real)[None]
    embeds, pooled = torch.randn(1, n, 32, generator=g), torch.randn(1, 24, generator=g)
    return Conditioning(embeds, None if real == n else mask, pooled)


def cases():
    g = torch.Generator().manual_seed(1)
    cond = text(2)
    audio = torch.randn(1, 9, 40, generator=g)
    t = torch.tensor([700.0])
    x = torch.randn(1, 3, 8, 24, 33, generator=g)  # 3 x 4 x 12 = 144 video tokens
    tail = torch.randn(1, 4, 8, 24, 33, generator=g)
    small = torch.randn(1, 2, 8, 8, 33, generator=g)  # 32 tokens: under 2 ranks the second holds only pad
    nabla = torch.randn(1, 2, 16, 32, 33, generator=g)  # 2 x 8 x 16 tokens: 4 NABLA tiles
    return {
        "t2av": (x, audio, cond, t, {}, None),
        "i2av": (tail, audio, cond, t, tail_frame_kwargs(1, 3, 8, 24, (1, 2, 2), "cpu"), None),
        "small": (small, audio, cond, t, {}, None),
        "nabla": (nabla, audio, cond, t, {}, SPEC),
        "video": (x, None, cond, t, {}, None),
    }


def run_cases(model):
    out = {}
    with torch.no_grad():
        for name, (x, audio, c, t, kwargs, spec) in cases().items():
            model.visual_attention.nabla = spec
            out[name] = model(x, audio, c.embeds, c.pooled, t, text_mask=c.mask, **kwargs)
    return out


def run_sampler(model, guided=None):
    g = torch.Generator().manual_seed(3)
    video, audio = torch.randn(1, 3, 8, 24, 16, generator=g), torch.randn(1, 9, 40, generator=g)
    kwargs = {} if guided is None else {"guided": guided}
    with torch.no_grad():
        return sample(model, video, audio, text(4), text(5, n=5, real=5), EulerSchedule.default(2),
                      guidance_scale=5.0, **kwargs)


def _worker(rank, world_size, root, layouts):
    """Each layout of ``layouts`` in turn on the same processes (one mesh each): one start for several layouts."""
    results = []
    for degrees in layouts:
        dims = ParallelDims(**degrees)
        dims.build_mesh("cpu")
        model, stats = load_rank_k6_dit(root, dims, torch.float32)
        if dims.sp_size > 1:
            apply_sequence_parallel(model, dims, stats)
        if dims.cfg == 2:
            results.append({"sampled": run_sampler(model, CfgParallel(dims).guided)})
            continue
        stats.reset()
        out = run_cases(model)
        out["calls"] = dict(stats.calls)
        results.append(out)
    return results


WORLD2 = [dict(ulysses=2), dict(ring=2), dict(tp=2)]


def test_two_process_layouts_equal_single_process(root):
    model = load_k6_dit(root, dtype=torch.float32)
    want = run_cases(model)
    per_rank = run_distributed(_worker, 2, root, WORLD2)
    for i, degrees in enumerate(WORLD2):
        results = [r[i] for r in per_rank]
        for got in results:
            for name, (w_video, w_audio) in want.items():
                g_video, g_audio = got[name]
                assert rel_err(g_video, w_video) <= TOL, (degrees, name)
                assert (g_audio is None) == (w_audio is None)
                if w_audio is not None:
                    assert rel_err(g_audio, w_audio) <= TOL, (degrees, name)
                    # replicated audio: the same on every rank
                    assert torch.equal(g_audio, results[0][name][1]), (degrees, name)
        if degrees.get("ulysses", 1) * degrees.get("ring", 1) > 1:
            # av's partial outputs and lse: 2 gathers per fused block and forward with audio, + the video output
            # gather (+ the ring's gather of NABLA's pooled keys, once per block of the NABLA forward)
            blocks, with_audio = model.config.num_visual_blocks, sum(c[1] is not None for c in cases().values())
            ring_nabla = blocks if degrees.get("ring", 1) > 1 else 0
            assert results[0]["calls"]["all_gather"] == len(cases()) + 2 * blocks * with_audio + ring_nabla
    # NABLA is sparse here: dense attention on the same input differs
    model.visual_attention.nabla = None
    x, audio, c, t, _, _ = cases()["nabla"]
    with torch.no_grad():
        assert rel_err(model(x, audio, c.embeds, c.pooled, t)[0], want["nabla"][0]) > 1e-3


def test_cfg_parallel_x_ulysses_sampling_equals_sequential(root):
    model = load_k6_dit(root, dtype=torch.float32)
    want = run_sampler(model)
    results = [r[0]["sampled"] for r in run_distributed(_worker, 4, root, [dict(cfg=2, ulysses=2)])]
    for got in results:
        for g, w in zip(got, want):
            assert rel_err(g, w) <= TOL
        assert torch.equal(got[1], results[0][1])


def test_tp_must_cut_both_streams():
    from k5.engine.model.k6_config import K6Config
    from k5.parallel.k6 import check_tensor_parallel

    cfg = K6Config.from_json(k6_tiny_checkpoint(kind="sft") / "transformer" / "config.json")
    check_tensor_parallel(cfg, 2)
    with pytest.raises(LayoutError, match="--tp-degree 4 does not divide the model's 2 heads"):
        check_tensor_parallel(cfg, 4)  # 4 video heads, but 2 audio heads
