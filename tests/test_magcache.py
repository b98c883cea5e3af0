"""MagCache: the skip decisions against the reference rule written out here, the DiT hook, numerics off and on,
and one process against CFG parallel x Ulysses 2 (fp32 latents, relative error <= 1e-4)."""

import numpy as np
import pytest
import torch

from distributed import run_distributed
from k5.engine.catalogue import variants as V
from k5.engine.sampling.chain import Guidance, StepCall, compose
from k5.engine.sampling.magcache import MagCache, forwards, skip_plan
from k5.engine.sampling.sampler import Conditioning, combine_cfg, model_input, sample, timesteps, uses_cfg
from k5.parallel.cfg import CfgParallel
from k5.parallel.mesh import ParallelDims
from k5.parallel.sequence import apply_sequence_parallel
from numerics import rel_err
from test_sharded_load import CFG, build_model


class ReferenceMagCache:
    """The bookkeeping of kandinskylab/kandinsky-5 kandinsky/magcache_utils.py (set_magcache_params and
    magcache_forward), call by call: a counter over 2*steps calls, +2 per call without CFG."""

    def __init__(self, mag_ratios, num_steps, no_cfg):
        self.cnt, self.num_steps = 0, num_steps * 2
        self.thresh, self.K, self.retention = 0.12, 2, 0.2
        self.err, self.steps, self.ratio = [0.0, 0.0], [0, 0], [1.0, 1.0]
        self.mag = np.array([1.0] * 2 + list(mag_ratios))
        self.no_cfg = no_cfg
        if len(self.mag) != num_steps * 2:
            def nearest_interp(src, n):
                if n == 1:
                    return np.array([src[-1]])
                return src[np.round(np.arange(n) * ((len(src) - 1) / (n - 1))).astype(int)]
            con, ucon = nearest_interp(self.mag[0::2], num_steps), nearest_interp(self.mag[1::2], num_steps)
            self.mag = np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1)

    def forward(self) -> bool:
        skip, b = False, self.cnt % 2
        if self.cnt >= int(self.num_steps * self.retention):
            self.ratio[b] = self.ratio[b] * self.mag[self.cnt]
            self.steps[b] += 1
            self.err[b] += np.abs(1 - self.ratio[b])
            if self.err[b] < self.thresh and self.steps[b] <= self.K:
                skip = True
            else:
                self.err[b], self.steps[b], self.ratio[b] = 0, 0, 1.0
        self.cnt += 2 if self.no_cfg else 1
        if self.cnt >= self.num_steps:
            self.cnt, self.ratio, self.err, self.steps = 0, [1.0, 1.0], [0.0, 0.0], [0, 0]
        return skip


def reference_skips(ratios, steps, no_cfg):
    ref, skipped = ReferenceMagCache(ratios, steps, no_cfg), set()
    for step in range(steps):  # generation_utils.get_velocity: the conditional forward first
        for branch in ("cond",) if no_cfg else ("cond", "uncond"):
            if ref.forward():
                skipped.add((step, branch))
    return skipped


@pytest.mark.parametrize("name", ["t2v-lite-sft-5s", "t2v-lite-nocfg-5s", "t2v-pro-sft-5s-hd", "i2v-pro-sft-5s-sd",
                                  "t2v-lite-sft-10s", "t2v-pro-sft-10s-hd"])
@pytest.mark.parametrize("steps", [50, 30, 16, 8])
def test_decisions_equal_the_reference_rule(name, steps):
    v = V.get(name)
    no_cfg = not uses_cfg(v.guidance_scale)
    want = reference_skips(v.mag_ratios, steps, no_cfg)
    got = {(s, b) for s, b in skip_plan(v.mag_ratios, steps) if not (no_cfg and b == "uncond")}
    assert got == want
    assert len(want) >= steps // 4  # the rule does skip: a test that cannot fail by an empty plan
    f = forwards(v.mag_ratios, steps, guided=not no_cfg)
    assert f.run + len(f.skipped) == steps * (1 if no_cfg else 2)
    assert {tuple(s) for s in f.skipped} == want


def test_no_ratios_no_skips():
    f = forwards(None, 50, guided=True)
    assert (f.run, f.skipped) == (100, [])


# ---- the DiT hook and the stage ---------------------------------------------------------------------------------

LATENT = (1, 3, 6, 10, CFG.in_visual_dim)
STEPS, SCALE = 10, 5.0
RATIOS = V.get("t2v-lite-sft-5s").mag_ratios  # at 10 steps: skips cond and uncond at steps 2, 3, 5, 6, 8


def conditionings(seed=1):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: Conditioning(torch.randn(1, 6, CFG.in_text_dim, generator=g),  # noqa: E731
                                  (torch.arange(6) < n)[None], torch.randn(1, CFG.in_text_dim2, generator=g))
    return make(6), make(3)


def noise():
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(3))


def velocity_of(model):
    return lambda inp, t, c, **kw: model(inp, c.embeds, c.pooled, t, text_mask=c.mask, **kw)


def test_skipped_forward_runs_text_blocks_and_out_layer_only():
    model = build_model()
    calls = {"text": 0, "visual": 0, "out": 0}
    for key, module in (("text", model.text_transformer_blocks[0]), ("visual", model.visual_transformer_blocks[0]),
                        ("out", model.out_layer)):
        module.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
    cond, _ = conditionings()
    x = model_input(noise(), True, None)
    seen = {}

    def remember(visual, run):
        out = run(visual)
        seen["residual"] = out - visual
        return out

    def reuse(visual, run):
        seen["input"] = visual
        return visual + seen["residual"]

    with torch.no_grad():
        model(x, cond.embeds, cond.pooled, torch.tensor([900.0]), text_mask=cond.mask, visual_stack=remember)
        assert calls == {"text": 1, "visual": 1, "out": 1}
        skipped = model(x, cond.embeds, cond.pooled, torch.tensor([800.0]), text_mask=cond.mask, visual_stack=reuse)
        assert calls == {"text": 2, "visual": 1, "out": 2}
        # The out layer's input is the new step's visual input plus the cached residual: compare with the out
        # layer applied to that by hand (time embedding of t=800 and the same pooled vector).
        time_embed = model.time_embeddings(torch.tensor([800.0])) + model.pooled_text_embeddings(cond.pooled).float()
        by_hand = model.out_layer(seen["input"] + seen["residual"], time_embed)
        by_hand = by_hand.unflatten(1, (3, 3, 5))
        from k5.engine.model.dit import unpatchify
        # Bitwise: the same modules on the same tensors as inside the skipped forward.
        assert torch.equal(skipped, unpatchify(by_hand, CFG.patch_size, CFG.out_visual_dim))


def old_sample(velocity, noise, cond, uncond, steps, guidance_scale):
    """The sampler loop as it was before the step chain (engine/sampling/sampler.py at 4335862), for bit-identity."""
    ts = timesteps(steps)
    x = noise.float()
    for i in range(steps):
        inp = model_input(x, True, None)
        t = (ts[i] * 1000).expand(x.shape[0])
        v = velocity(inp, t, cond).float()
        if uncond is not None and uses_cfg(guidance_scale):
            v = combine_cfg(v, velocity(inp, t, uncond).float(), guidance_scale)
        x = x + (ts[i + 1] - ts[i]) * v
    return x


def test_magcache_off_is_bit_identical_to_before():
    model = build_model()
    cond, uncond = conditionings()
    with torch.no_grad():
        want = old_sample(velocity_of(model), noise(), cond, uncond, STEPS, SCALE)
        got = sample(velocity_of(model), noise(), cond, uncond, steps=STEPS, guidance_scale=SCALE)
        identity = sample(velocity_of(model), noise(), cond, uncond, steps=STEPS, guidance_scale=SCALE,
                          chain=[_PassThrough()])
    assert torch.equal(got, want)
    assert torch.equal(identity, want)


class _PassThrough:
    """A stage that hands the DiT a visual_stack that just runs the blocks."""

    guides = False

    def __call__(self, call, next):
        return next(call.with_dit_kwargs(visual_stack=lambda v, run: run(v)))


def magcache_sample(model, chain_front=(), cache=None):
    cond, uncond = conditionings()
    cache = cache or MagCache(RATIOS)
    with torch.no_grad():
        latents = sample(velocity_of(model), noise(), cond, uncond, steps=STEPS, guidance_scale=SCALE,
                         chain=[*chain_front, cache])
    return latents, cache


def test_magcache_stage_skips_the_plan_and_changes_the_result():
    model = build_model()
    latents, cache = magcache_sample(model)
    plan = skip_plan(RATIOS, STEPS)
    assert set(cache.skipped) == plan and len(plan) == 10
    assert len(cache.ran) == 2 * STEPS - len(plan)
    cond, uncond = conditionings()
    with torch.no_grad():
        plain = sample(velocity_of(model), noise(), cond, uncond, steps=STEPS, guidance_scale=SCALE)
    assert 1e-6 < rel_err(latents, plain) < 0.5  # skipping changed the result, but not into something else
    # The same stage on a second item starts afresh, after an explicit Guidance stage as after the implicit one.
    again, cache2 = magcache_sample(model, [Guidance()], cache=cache)
    assert torch.equal(again, latents) and set(cache2.skipped) == plan and len(cache2.ran) == 10


def test_magcache_needs_a_branch():
    with pytest.raises(ValueError, match="step chain needs exactly one guiding stage, first"):
        compose([MagCache(RATIOS), CfgParallel.__new__(CfgParallel)], lambda *a: None)
    call = StepCall(torch.zeros(1), torch.zeros(1), 0, 1, 5.0, conditionings()[0])
    with pytest.raises(ValueError, match="after the guiding stage"):
        MagCache(RATIOS)(call, lambda c: c)


def _worker(rank, world_size, degrees):
    dims = ParallelDims(**degrees)
    dims.build_mesh("cpu")
    model = build_model()
    if dims.sp_size > 1:
        apply_sequence_parallel(model, dims)
    latents, cache = magcache_sample(model, [CfgParallel(dims)])
    return dict(cfg_rank=dims.rank("cfg"), latents=latents, skipped=list(cache.skipped),
                ran=list(cache.ran))


def test_cfg_parallel_x_ulysses_equals_one_process():
    want, cache = magcache_sample(build_model())
    results = run_distributed(_worker, 4, dict(cfg=2, ulysses=2))
    plan = skip_plan(RATIOS, STEPS)
    for r in results:
        branch = ("cond", "uncond")[r["cfg_rank"]]
        # Each half followed its own branch's accumulator, and every rank of a half took the same decisions.
        assert set(r["skipped"]) == {k for k in plan if k[1] == branch}
        assert {b for _, b in r["ran"]} == {branch}
        assert rel_err(r["latents"], want) <= 1e-4
        assert torch.equal(r["latents"], results[0]["latents"])  # every rank steps with the same gathered tensors
