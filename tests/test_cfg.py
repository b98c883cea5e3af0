"""CFG parallelism (with text sharing) against the sequential sampler in one process, fp32, rel err <= 1e-4.

Each rank records which conditioning its DiT evaluated and which prompts its text encoder saw; the encoder is a
deterministic stand-in (the real one runs in test_parallel_generate.py).
"""

import zlib

import torch

from distributed import run_distributed
from k5.engine.sampling.chain import Guidance
from k5.engine.sampling.sampler import Conditioning, sample
from k5.engine.encoders.text import TextEmbeds
from k5.parallel.cfg import BranchText, CfgParallel
from k5.parallel.mesh import ParallelDims
from k5.parallel.sequence import apply_sequence_parallel
from k5.parallel.tensor import apply_tensor_parallel
from k5.parallel.text_share import SharedText, is_text_source
from numerics import rel_err
from test_sharded_load import CFG, build_model

PROMPT, NEGATIVE = "a cat walks on the grass in the park at night", "static"
LATENT = (1, 3, 6, 10, CFG.in_visual_dim)  # 45 tokens: padded under sequence parallelism
STEPS, SCALE = 3, 5.0


class FakeEncoder:
    """Deterministic per-prompt embeddings, shaped like engine.encoders.text.TextEncoder's; records what it encoded."""

    def __init__(self):
        self.seen, self.released = [], False

    def encode(self, prompts):
        self.seen.append(list(prompts))
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            n = min(len(p.split()), 6)
            rows.append((torch.randn(1, 6, CFG.in_text_dim, generator=g),
                         (torch.arange(6) < n)[None], torch.randn(1, CFG.in_text_dim2, generator=g)))
        return TextEmbeds(*(torch.cat(t) for t in zip(*rows)), [len(p.split()) > 6 for p in prompts])

    def release(self):
        self.released = True


def conditionings(e: TextEmbeds):
    """What Kandinsky5Pipeline.encode does with the encoder output."""
    return [Conditioning(e.embeds[i : i + 1], e.mask[i : i + 1], e.pooled[i : i + 1]) for i in range(2)]


def noise():
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(3))


def run_sampler(model, cond, uncond, guiding, log=None):
    def velocity(inp, t, c):
        if log is not None:
            log.append("cond" if torch.equal(c.embeds, cond.embeds) else "uncond")
        return model(inp, c.embeds, c.pooled, t, text_mask=c.mask)

    with torch.no_grad():
        return sample(velocity, noise(), cond, uncond, steps=STEPS, guidance_scale=SCALE, chain=[guiding])


class capture_first:
    """The guiding stage ``inner`` of the step chain, keeping the first step's combined velocity in ``out``."""

    guides = True

    def __init__(self, inner, out: list):
        self.inner, self.out = inner, out

    def __call__(self, call, next):
        v = self.inner(call, next)
        if not self.out:
            self.out.append(v)
        return v


def reference():
    """Sequential single-process run: one encoder call for both prompts, both branches every step."""
    cond, uncond = conditionings(FakeEncoder().encode([PROMPT, NEGATIVE]))
    first = []
    latents = run_sampler(build_model(), cond, uncond, capture_first(Guidance(), first))
    return latents, first[0]


def _cfg_worker(rank, world_size, degrees):
    dims = ParallelDims(**degrees)
    dims.build_mesh("cpu")
    model = build_model()
    stats = apply_tensor_parallel(model, dims)
    if dims.sp_size > 1:
        apply_sequence_parallel(model, dims, stats)
    encoder = FakeEncoder() if is_text_source(dims) else None
    text = BranchText(SharedText.for_dims(encoder, dims, "cpu"), dims)
    e = text.encode([PROMPT, NEGATIVE])
    cond, uncond = conditionings(e)
    first, log = [], []
    latents = run_sampler(model, cond, uncond, capture_first(CfgParallel(dims, stats), first), log)
    other = 1 - dims.rank("cfg")  # the row this half did not encode
    placeholder_nan = bool(torch.isnan(e.embeds[other]).all() and torch.isnan(e.pooled[other]).all())
    return dict(cfg_rank=dims.rank("cfg"), log=log, latents=latents, v0=first[0], truncated=e.truncated,
                placeholder_nan=placeholder_nan,
                seen=None if encoder is None else encoder.seen, released=encoder is not None and encoder.released,
                cfg_bytes=stats.bytes["all_gather"])


def check_cfg_results(results, want, want_v0):
    branch = ("cond", "uncond")
    sources = {}
    for rank, r in enumerate(results):
        # The two guidance branches run on different ranks: each half evaluated only its own conditioning.
        assert r["log"] == [branch[r["cfg_rank"]]] * STEPS, (rank, r["log"])
        assert rel_err(r["v0"], want_v0) <= 1e-4
        assert rel_err(r["latents"], want) <= 1e-4
        assert torch.equal(r["latents"], results[0]["latents"])  # identical on every rank: the same gathered tensors
        assert r["truncated"] == [True, False]  # the prompt's flag reached the half that did not encode it
        assert r["placeholder_nan"]  # the other half's row would poison any accidental use
        if r["seen"] is not None:
            sources.setdefault(r["cfg_rank"], []).append(r["seen"])
            assert r["released"]
    # One encoder per half, and it encoded only its own prompt, once.
    assert sources == {0: [[[PROMPT]]], 1: [[[NEGATIVE]]]}


def test_cfg_parallel_x_ulysses_equals_sequential():
    want, want_v0 = reference()
    results = run_distributed(_cfg_worker, 4, dict(cfg=2, ulysses=2))
    check_cfg_results(results, want, want_v0)
    assert [r["cfg_rank"] for r in results] == [0, 0, 1, 1]


def test_cfg_ring_tp_three_degrees_equals_sequential():
    want, want_v0 = reference()
    results = run_distributed(_cfg_worker, 8, dict(cfg=2, ring=2, tp=2))
    check_cfg_results(results, want, want_v0)
