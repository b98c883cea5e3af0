"""k5's runs on fake CUDA (tests/fakecuda.py): one rank of a layout through the sampler, and what must hold after it.

A rank is built as ``k5.parallel.tensor.load_rank_dit`` and ``k5.parallel.plan.build_parallel`` build it, minus the file
reads: the DiT on meta, cut for tensor parallelism, sequence parallelism applied, then every parameter a fake tensor
of the rank's device (bf16, the modulation fp32 as ``checkpoint.keeps_fp32`` says). The text conditioning is fake
embeddings of the real shapes (a Qwen2.5-VL of 7B parameters adds nothing the DiT does not see as its input).

``check(run)`` lists what is wrong; ``run_rank`` + ``check`` is one case of tests/test_fakecuda.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

from fakecuda import COLLECTIVE, D2H, H2D, SYNC, FakeCuda, flex_calls, flex_tile_problems
from k5.engine.checkpoints.dit import keeps_fp32
from k5.engine.model.config import PRESETS, DiTConfig
from k5.engine.model.dit import Kandinsky5DiT
from k5.engine.pipelines.video import rope_scale
from k5.engine.sampling.sampler import Conditioning, initial_noise, sample
from k5.parallel.cfg import CfgParallel
from k5.parallel.comm_stats import CommStats
from k5.parallel.mesh import LayoutError
from k5.parallel.plan import plan_parallel
from k5.parallel.sequence import apply_sequence_parallel
from k5.parallel.tensor import apply_tensor_parallel

WORLD = 8
TEXT_TOKENS = 256  # the video prompt budget (engine/encoders/text.py)
GUIDANCE = 5.0

# The model shapes of the issue (kandinsky5-architecture.md 1.1, 5.x): preset, frames, height, width.
SHAPES = {
    "lite-5s": ("lite", 121, 512, 768),
    "lite-10s-nabla": ("lite-10s", 241, 512, 768),
    "pro-5s-sd": ("pro", 121, 512, 768),
    "pro-5s-hd": ("pro-hd", 121, 768, 1280),
}
TECHNIQUES = ("dp", "cfg", "ring", "ulysses", "tp")

# Host-to-device copies the first step of an item may make, once per shape or item (none is allowed later).
FIRST_STEP_COPIES = {
    "engine/sampling/sampler.py:sample": "the schedule's times, copied once per item before the loop",
    "engine/model/dit.py:_device_freqs": "time-embedding frequencies, computed on the host as the original does, once "
                                   "per device (engine.model.dit.DeviceTables)",
    "engine/model/dit.py:_text_rope": "text RoPE table, once per text length",
    "engine/model/dit.py:rope_angles_3d": "visual RoPE tables, once per token grid",
}
# Collectives that take host memory on purpose (gloo groups), with why.
HOST_COLLECTIVES = {
    "launch/supervisor.py:agree_stop": "the stop agreement: one int in host memory over the item group's gloo twin",
}


def accepted_layouts(config: DiTConfig, world: int = WORLD) -> list[dict[str, int]]:
    """Every set of degrees the planner accepts for ``config`` on ``world`` ranks (plan_parallel, as the CLI)."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    found = []
    for tp in divisors:
        for cfg in (1, 2):
            for dp in divisors:
                for ulysses in divisors:
                    rest = tp * cfg * dp * ulysses
                    if world % rest:
                        continue
                    try:
                        dims = plan_parallel(world, config, tp=tp, cfg_parallel=cfg == 2, dp=dp, ulysses=ulysses,
                                             ring=world // rest)
                    except LayoutError:
                        continue
                    if dims.degrees not in found:
                        found.append(dims.degrees)
    return found


def layout_name(degrees: dict[str, int]) -> str:
    short = {"dp": "dp", "cfg": "cfg", "ring": "r", "ulysses": "u", "tp": "tp"}
    parts = [f"{short[k]}{v}" for k, v in degrees.items() if v > 1]
    return "x".join(parts) or "single"


def model_config(preset: str, depth: int | None) -> DiTConfig:
    """The preset's config; ``depth`` visual blocks instead of all of them (every block is the same code on the same
    shapes, so a case checks the same thing with 2 as with 60, in a fraction of the time)."""
    cfg = PRESETS[preset]
    return cfg if depth is None else cfg.replace(num_visual_blocks=min(depth, cfg.num_visual_blocks))


def build_dit(fc: FakeCuda, cfg: DiTConfig, dims) -> tuple[Kandinsky5DiT, CommStats]:
    """This rank's DiT for ``dims`` (mesh already built), as load_rank_dit + apply_sequence_parallel make it."""
    with torch.device("meta"):
        dit = Kandinsky5DiT(cfg)
    stats = CommStats()
    if dims.world_size > 1:
        apply_tensor_parallel(dit, dims, stats)
        if dims.sp_size > 1:
            apply_sequence_parallel(dit, dims, stats)
    fc.module(dit, torch.bfloat16, fp32=keeps_fp32)
    return dit, stats


def conditioning(cfg: DiTConfig, device, masked: bool = True) -> Conditioning:
    embeds = torch.randn(1, TEXT_TOKENS, cfg.in_text_dim, device=device, dtype=torch.bfloat16)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device) if masked else None
    return Conditioning(embeds, mask, torch.randn(1, cfg.in_text_dim2, device=device, dtype=torch.bfloat16))


@dataclass
class Run:
    """What a rank did: its FakeCuda (events, graphs), the final latent, every DiT forward's output, an error."""

    fc: FakeCuda
    latent_shape: tuple
    latents: torch.Tensor | None = None
    forwards: list[torch.Tensor] = field(default_factory=list)
    compute_dtype: torch.dtype = torch.bfloat16
    nabla: bool = False
    error: str | None = None


def sampled(fc: FakeCuda, run: Run, velocity, noise, cond, uncond, steps: int, **kwargs) -> Run:
    """``sample`` with every DiT output kept and the watch told which step is running; a read of device data in
    the loop (which raises under fake tensors) becomes ``run.error`` naming the k5 line."""

    def recorded(*args, **kw):
        out = velocity(*args, **kw)
        run.forwards.append(out)
        return out

    try:
        with torch.inference_mode(), fc.watch.sampling(steps) as on_step:
            run.latents = sample(recorded, noise, cond, uncond, steps=steps, on_step=on_step, **kwargs)
    except (DataDependentOutputException, DynamicOutputShapeException) as e:
        last = fc.watch.events[-1] if fc.watch.events else None
        run.error = f"{type(e).__name__} ({e}) after {last}"
    return run


def run_rank(shape: str, degrees: dict[str, int], rank: int, depth: int | None = 2, steps: int = 2,
             compiled: bool = False, capability=(9, 0)) -> Run:
    """Rank ``rank`` of the layout ``degrees`` (8 ranks; {} = one GPU) through ``steps`` CFG steps at ``shape``."""
    preset, frames, height, width = SHAPES[shape]
    cfg = model_config(preset, depth)
    world = WORLD if degrees else 1
    latent_shape = (1, (frames - 1) // 4 + 1, height // 8, width // 8, 16)
    with FakeCuda(rank, world, capability) as fc:
        dims = plan_parallel(world, cfg, tp=degrees.get("tp", 1), cfg_parallel=degrees.get("cfg", 1) == 2,
                             dp=degrees.get("dp", 1), ulysses=degrees.get("ulysses", 1), ring=degrees.get("ring", 1))
        if world > 1:
            fc.build_mesh(dims)
        dit, stats = build_dit(fc, cfg, dims)
        if compiled:
            from k5.engine.compile import compile_blocks

            compile_blocks(dit)
        cond, uncond = conditioning(cfg, fc.device), conditioning(cfg, fc.device)
        noise = initial_noise(latent_shape, 0, fc.device)
        sf = rope_scale(height, width)
        run = Run(fc, latent_shape, nabla=dit.nabla is not None)
        chain = [CfgParallel(dims, stats)] if dims.cfg == 2 else []
        sampled(fc, run, lambda inp, t, c, **kw: dit(inp, c.embeds, c.pooled, t, scale_factor=sf, text_mask=c.mask,
                                                         **kw),
                noise, cond, uncond, steps, guidance_scale=GUIDANCE, shift=5.0, visual_cond=cfg.visual_cond,
                chain=chain)
    return run


def check(run: Run) -> list[str]:
    """Everything wrong with a run on fake CUDA; empty when it is fine."""
    fc, watch, gpu = run.fc, run.fc.watch, run.fc.gpu
    problems = [run.error] if run.error else []
    if run.latents is not None:
        lat = run.latents
        if tuple(lat.shape) != run.latent_shape or lat.device != gpu or lat.dtype != torch.float32:
            problems.append(f"latents {tuple(lat.shape)} {lat.dtype} on {lat.device}; want {run.latent_shape} "
                            f"float32 on {gpu}")
    for i, out in enumerate(run.forwards):
        if out.device != gpu or out.dtype != run.compute_dtype or tuple(out.shape) != run.latent_shape:
            problems.append(f"DiT forward {i}: {tuple(out.shape)} {out.dtype} on {out.device}; want "
                            f"{run.latent_shape} {run.compute_dtype} on {gpu}")
    for e in watch.of(COLLECTIVE):
        if e.site in HOST_COLLECTIVES:
            continue
        if any(d != gpu for d in e.devices):
            problems.append(f"a collective got tensors not on this rank's GPU {gpu}: {e}")
    problems += [f"device-to-host sync in the step loop: {e}" for e in watch.of(D2H, loop_only=True)]
    problems += [f"device synchronize in the step loop: {e}" for e in watch.of(SYNC, loop_only=True)]
    problems += [f"host-to-device copy in a step after the first: {e}" for e in watch.of(H2D, steady=True)]
    problems += [f"host-to-device copy in the first step, not a once-per-shape table: {e}"
                 for e in watch.of(H2D, loop_only=True) if e.site not in FIRST_STEP_COPIES]
    calls = flex_calls(fc.graphs)
    if run.nabla and not calls and run.error is None:
        problems.append("NABLA ran without FlexAttention (the CUDA kernel) on a CUDA device")
    for call in calls:
        for capability in ((9, 0), (10, 0)):
            problems += [f"flex tiles: {p}" for p in flex_tile_problems(call, capability)]
    return problems


def expect_ok(run: Run) -> None:
    problems = check(run)
    assert not problems, "\n".join(problems)


# ---- whole pipelines ---------------------------------------------------------------------------------------------


class StandInText:
    """The text encoders' output at its real shapes (Qwen2.5-VL hidden states, the key mask, CLIP's pooled vector)
    in place of 8B parameters of encoders whose output is all the DiT sees."""

    def __init__(self, cfg: DiTConfig, device, tokens: int = TEXT_TOKENS):
        self.cfg, self.device, self.tokens = cfg, device, tokens
        self.calls = 0

    def encode(self, prompts, **kwargs):
        from k5.engine.encoders.text import TextEmbeds

        self.calls += 1
        n = len(prompts)
        return TextEmbeds(torch.randn(n, self.tokens, self.cfg.in_text_dim, device=self.device, dtype=torch.bfloat16),
                          torch.ones(n, self.tokens, dtype=torch.bool, device=self.device),
                          torch.randn(n, self.cfg.in_text_dim2, device=self.device), [False] * n)

    def release(self) -> None:
        pass


def video_vae(fc: FakeCuda):
    """The HunyuanVideo VAE (diffusers' defaults are its configuration, kandinsky5-architecture.md 6.1), fp16 as
    the pipeline loads it on a GPU, tiled as engine.vae.video.VideoVAE sets it."""
    from diffusers import AutoencoderKLHunyuanVideo

    from k5.engine.vae.video import VideoVAE

    with torch.device("meta"):
        ae = AutoencoderKLHunyuanVideo()
    return VideoVAE(fc.module(ae, torch.float16))


def image_vae(fc: FakeCuda):
    """The FLUX.1-dev VAE (AutoencoderKL, 16 latent channels), bf16 as ImagePipeline loads it on a GPU."""
    from diffusers import AutoencoderKL

    from k5.engine.vae.image import ImageVAE

    with torch.device("meta"):
        ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                           layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                           scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                           use_post_quant_conv=False)
    return ImageVAE(fc.module(ae, torch.bfloat16))


def counted_forwards(fc: FakeCuda, run: Run, pipe, steps: int) -> None:
    """Keep every DiT output of ``pipe`` in ``run.forwards``; the first one starts the watch's step loop."""
    velocity = pipe.velocity

    def recorded(*args, **kwargs):
        fc.watch.loop_started(steps)
        out = velocity(*args, **kwargs)
        run.forwards.append(out)
        return out

    pipe.velocity = recorded


def parallel_text(fc: FakeCuda, cfg: DiTConfig, dims, stats, tokens: int = TEXT_TOKENS):
    """The text path of build_parallel: encoders on the replica's source rank only, shared, split by CFG half."""
    from k5.parallel.cfg import BranchText
    from k5.parallel.text_share import SharedText, is_text_source

    if dims.world_size == 1:
        return StandInText(cfg, fc.device, tokens)
    encoder = StandInText(cfg, fc.device, tokens) if is_text_source(dims) else None
    text = SharedText.for_dims(encoder, dims, fc.device, keep=True, stats=stats)
    return BranchText(text, dims) if dims.cfg == 2 else text
