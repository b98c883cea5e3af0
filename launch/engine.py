"""The engine every front-end runs requests through: the CLI's single run, batch jobs (k5.launch.job), images, and
`k5 serve` (serve/engine.py).

    engine = Engine.load(job, env, EngineOptions.from_args(args), keep_text=False)   # once: weights, layout, kernels
    engine.join(sup)                                  # the supervisor's stop agreement over the item group
    result = engine.run(request, on_step=..., should_stop=...)   # one Request or ImageRequest, every rank of the group

``Engine.load`` builds the runtime once from a resolved, checked model (k5.launch.generate.Job: its Checkpoint, DiT
config, LoRA adapters, MagCache ratios) and its parallel plan (the Job's ParallelDims): k5.parallel.plan builds the
pipeline on the mesh, the fast path picks the attention kernel and compiles. ``run`` takes one request after another;
between them ``switch_adapters`` and ``expand`` change what the next one runs with.

Stopping: at each step boundary (after every denoising step, and before the decode) every rank of the item group
agrees, in one collective, on whether to stop: ``should_stop()`` answering yes on any rank raises ``Cancelled`` (a
Stopped); else a stop signal anywhere (k5.launch.supervisor: SIGTERM/SIGINT, a peer that received one) raises
``Stopped``.
Either way the run returns nothing and the caller publishes nothing.

This module sits in launch/ because it knows both the engine and parallel/; engine/ knows neither.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from k5.launch.env import DTYPES
from k5.launch.signals import Stopped


class Cancelled(Stopped):
    """Every rank of the item group agreed at a step boundary that ``should_stop()`` said yes on one of them."""


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, from the generate command's flags."""

    dtype: str = "bf16"  # a key of DTYPES
    offload: str = "none"
    attention: str = "auto"
    nabla_threshold: float | None = None
    compile: bool = False
    attention_backend: str = "auto"

    @classmethod
    def from_args(cls, args) -> "EngineOptions":
        return cls(args.dtype, args.offload, args.attention, args.nabla_threshold, bool(args.compile),
                   args.attention_backend)


@dataclass
class Engine:
    pipe: object  # Kandinsky5Pipeline or ImagePipeline, parallel where the layout says so
    dims: object  # ParallelDims with its mesh
    stages: list  # the layout's step-chain stages (CfgParallel), in front of every request's chain
    stats: object  # CommStats of every collective, None on one process
    group: object  # the process group of the ranks that share an item (None: this process alone)
    group_rank: int
    dp_rank: int
    describe: str
    device: torch.device = torch.device("cpu")
    decode_report: list = field(default_factory=list)  # per-rank lines of the last split decode (group rank 0)
    dit_forwards: int = 0  # DiT forwards that ran the visual blocks on this rank (counted by a forward hook)
    fast: object = None  # engine.fastpath.FastPath: attention kernel and compile watch
    estimate: object = None  # engine.memory.Estimate made before loading
    ratios: tuple | None = None  # MagCache: the variant's ratios (the step cache is a stage of the step chain)
    image: bool = False  # an Image Lite pipeline: images are decoded on the group's rank 0
    k6: bool = False  # a Kandinsky 6 pipeline (video with audio: engine/pipelines/k6.py)
    sr: object = None  # Kandinsky 6 --upscale: the super-resolution stage (engine.pipelines.k6_sr.SRStage)
    upscale: str | None = None  # its target
    supervisor: object = None  # k5.launch.supervisor.Supervisor once joined: its stop agreement and heartbeat

    # ---- building --------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, job, env, options: EngineOptions, keep_text: bool) -> "Engine":
        """The runtime of ``job`` (k5.launch.generate.Job) on this rank: every weight loaded on the planned layout.
        ``keep_text``: keep the text encoders after the first encode (more than one request will run)."""
        from k5.engine.fastpath import setup_fast_path
        from k5.parallel.plan import build_parallel

        # The resolved checkpoint: components from its root, the DiT from its folder or single file with the config
        # the variant gives it (a NABLA-trained file runs NABLA with the variant's P).
        if job.k6:
            from k5.parallel.k6 import build_k6_parallel

            s = build_k6_parallel(job.weights, job.dims, dtype=DTYPES[options.dtype], device=env.device,
                                  keep_text=keep_text, audio=job.audio, config=job.cfg)
        else:
            s = build_parallel(job.weights, job.dims, dtype=DTYPES[options.dtype], device=env.device,
                               keep_text=keep_text, expand=job.expand, adapters=job.adapters,
                               offload=options.offload, config=job.cfg)
        if env.world == 1 and not keep_text and options.offload != "none" and not job.k6:
            s.pipeline.text_after_encode = "release"  # one video: the encoders are never needed again
        s.pipeline.dit.set_attention(options.attention, options.nabla_threshold)
        engine = cls(s.pipeline, s.dims, s.stages, s.stats, s.item_group, s.item_rank, s.dp_rank,
                     s.describe() if env.world > 1 else "", env.device, estimate=env.estimate, ratios=job.ratios,
                     image=job.image, k6=job.k6)
        if job.upscale is not None:
            from k5.engine.pipelines.k6_sr import SRStage

            engine.sr, engine.upscale = SRStage.from_pretrained(job.sr_root, DTYPES[options.dtype], env.device), \
                job.upscale
        shapes = {(item.request.num_frames, item.request.height, item.request.width) for item in job.items}
        engine.fast = setup_fast_path(engine.pipe.dit, env.device, options.compile, options.attention_backend,
                                      len(shapes), ring=s.dims.ring, attention_calls=attention_calls(engine, shapes))
        engine.count_forwards()
        return engine

    def join(self, sup) -> None:
        """Run under ``sup`` (this rank's Supervisor): its heartbeat after every step and its stop agreement over
        this engine's item group."""
        self.supervisor = sup
        sup.set_group(self.group, self.group_size, self.dp_rank)

    # ---- what a front-end asks ------------------------------------------------------------------------------------

    @property
    def group_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def leader(self) -> bool:
        """This rank holds the group's decoded frames: it writes the group's files and records."""
        return self.group_rank == 0

    @property
    def chain(self) -> list:
        """The step chain of every request: the layout's stages, then the step cache when MagCache is on."""
        from k5.engine.sampling.magcache import MagCache

        # After the guiding stage (Guidance, or CfgParallel: each cfg half follows its own branch's accumulator).
        return [*self.stages, *([MagCache(self.ratios)] if self.ratios is not None else [])]

    def forwards(self) -> int:
        return self.dit_forwards

    def comm_steps(self) -> list:
        """Bytes sent by collective, one record per denoising step so far (none on one process)."""
        return [] if self.stats is None else self.stats.steps

    def count_forwards(self) -> None:
        def hook(module, args):
            self.dit_forwards += 1

        # The first visual block: a forward that MagCache skips still calls the DiT (text blocks, output layer)
        # but not its visual blocks.
        blocks = self.pipe.dit.visual_blocks if self.k6 else self.pipe.dit.visual_transformer_blocks
        blocks[0].register_forward_pre_hook(hook)

    def run(self, request, *, on_step: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, prompt: str | None = None, decode: bool = True):
        """One request on every rank of the item group: its Result (engine.pipelines.video.Result or ImageResult)
        with ``frames`` (uint8 [F, H, W, 3] on the group's leader, None elsewhere or without ``decode``).

        ``on_step(done, total)`` after every denoising step and once after the decode (``total``: the steps, plus
        one for the decode), on every rank; ``should_stop()`` at each step boundary, agreed over the group (see the
        module docstring: Stopped, Cancelled). ``prompt``: the text to encode instead of the request's own (an
        expansion, a LoRA's trigger phrase)."""
        from k5.launch.model import forwards

        total = request.steps + (1 if decode else 0)
        step_ends: list[float] = []

        def step(i: int) -> None:
            if self.stats is not None:
                self.stats.end_step()  # one record of bytes sent per denoising step
            step_ends.append(time.perf_counter())
            if on_step is not None:
                on_step(i + 1, total)
            if self.supervisor is not None:
                self.supervisor.step_done(i)
            self._boundary(should_stop, i + 1, request.steps)

        result = self.pipe.generate(request, on_step=step, chain=self.chain, prompt=prompt)
        result.forwards = forwards(self.ratios, request)  # the whole item's, both branches: the plan decides them
        result.step_ends = step_ends
        self._boundary(should_stop, request.steps, request.steps)  # before the decode: a stop while the last step ran is not decoded
        # Kandinsky 6: the audio latents (None: no audio, or Kandinsky 5) and, decoded on the leader, the waveform
        # with its sample rate for the video's audio track.
        result.audio_latents = result.audio if self.k6 else None
        result.audio_track = None
        if decode:
            t0 = time.perf_counter()
            result.frames = self.decode(result.latents)
            if self.sr is not None:
                t1 = time.perf_counter()
                result.frames = self.super_resolve(result.frames, request)
                result.timings["upscale_s"] = time.perf_counter() - t1
            if result.audio_latents is not None and self.leader:
                wave = self.pipe.decode_audio(result.audio_latents, request.num_frames)
                result.audio_track = (wave, self.pipe.audio.sample_rate)
            result.timings["decode_s"] = time.perf_counter() - t0
            if on_step is not None:
                on_step(total, total)
        return result

    def _boundary(self, should_stop: Callable[[], bool] | None, done: int, steps: int) -> None:
        """The group's stop agreement after step ``done``: Cancelled for a cancel, else Stopped for a stop signal
        (a cancel wins: the request is withdrawn, not to run again after a restart)."""
        cancel = None if should_stop is None else bool(should_stop())
        if self.supervisor is not None:
            stop = self.supervisor.agree_stop(cancel)
            if self.supervisor.agreed_cancel:
                raise Cancelled(f"cancelled after step {done} of {steps}")
            if stop:
                raise Stopped()
            return
        if cancel is None:
            return
        if self.group is not None and self.group_size > 1:
            flag = torch.tensor([int(cancel)], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            cancel = bool(flag.item())
        if cancel:
            raise Cancelled(f"cancelled after step {done} of {steps}")

    def switch_adapters(self, adapters) -> list[str]:
        """The DiT with ``adapters`` merged (every rank of the item group calls it; each re-reads its own slices of
        the base weights the old or new adapters touch, no communication). Returns the weights re-read."""
        if self.dims.world_size > 1:
            from k5.parallel.tensor import switch_dit_adapters

            return switch_dit_adapters(self.pipe.dit, self.pipe.checkpoint.dit, self.dims, adapters)
        from k5.engine.checkpoints.dit import switch_adapters

        return switch_adapters(self.pipe.dit, self.pipe.checkpoint.dit, adapters)

    def expand(self, req, reuse):
        """(the expansion of the request's prompt, the same on every rank of the item group; whether it was generated
        (True) or reused (False) on the rank that expands, None on the others)."""
        reused = []

        def ask():
            text = reuse()
            reused.append(text is not None)
            return text

        text = self.pipe.expand_prompt(req, reuse=ask)
        return text, (not reused[0]) if reused else None

    def super_resolve(self, frames, request):
        """The SR stage at its own layout: the item group's ranks deal the tiles (tile i to group rank i mod n), each
        refines and decodes its own, and the windowed tiles are summed onto the group's rank 0, which blends them.
        ``frames``: the decoded video on rank 0 (None elsewhere); returns the upscaled frames there, None elsewhere."""
        sr, n, me = self.sr, self.group_size, self.group_rank
        plan = sr.plan(request.height, request.width, self.upscale)
        if n > 1:  # the low-resolution frames to every rank of the group (uint8: 1/4 of the fp32 canvas)
            shape = ((request.num_frames, request.height, request.width, 3))
            buf = frames.contiguous().to(self.device) if me == 0 else torch.empty(shape, dtype=torch.uint8,
                                                                                   device=self.device)
            dist.broadcast(buf, group_src=0, group=self.group)
            frames = buf
        acc = sr.canvas(sr.to_input(frames, plan), plan, request.seed, range(me, len(plan.grid), n))
        if n > 1:
            dist.reduce(acc, group_dst=0, group=self.group)
        return sr.finish(acc, plan) if me == 0 else None

    def decode(self, latents):
        """uint8 frames [F, H, W, 3] on the group's rank 0, None on the others."""
        if self.group is None:
            return self.pipe.decode(latents)
        if self.image:
            # One 2D image: the group's rank 0 decodes it whole (the FLUX VAE decodes a 1024-class image in well under
            # a second on a GPU; tiles and their exchange would cost more than they save). The others go on.
            return self.pipe.decode(latents) if self.group_rank == 0 else None
        from k5.parallel.vae_tiles import parallel_decode

        frames, stats = parallel_decode(self.pipe.vae.vae, latents, group=self.group, dst=0)
        # One small gather after the decode, so the writing rank can report every rank's tiles, time and peak.
        lines = [None] * dist.get_world_size(self.group) if self.group_rank == 0 else None
        dist.gather_object(stats.summary(), lines, group=self.group, group_dst=0)
        self.decode_report = lines or []
        return None if frames is None else frames[0]


def attention_calls(engine: Engine, shapes) -> list:
    """This rank's dense attention calls at the job's sizes, which the kernels are probed on before the first step:
    text self-attention and cross-attention (with and without the text mask: a prompt that fills the budget has
    none) and the visual self-attention unless NABLA runs it (a ring chunk's, masked where the sequence is padded)."""
    from k5.kernels.attention import AttentionCall
    from k5.parallel.layout import SequenceLayout

    cfg, d = engine.pipe.dit.config, engine.dims
    heads, text = cfg.num_heads // d.tp, 512 if engine.image else 256
    calls = []
    for frames, height, width in shapes:
        tokens = ((frames - 1) // 4 + 1) * ((height or 1024) // 16) * ((width or 1024) // 16)  # image: a 1024 bucket
        layout = SequenceLayout(tokens, d.sp_size)
        local = layout.shard_len if d.sp_size > 1 else tokens
        for masked in (False, True):
            calls += [AttentionCall(text, text, heads, masked), AttentionCall(local, text, heads, masked)]
        if engine.pipe.dit.nabla is None and d.sp_size == 1:
            calls.append(AttentionCall(tokens, tokens, heads))
        elif engine.pipe.dit.nabla is None:
            span = local * d.ulysses  # a ring chunk: one span's tokens after the all-to-all, the rank's heads
            calls += [AttentionCall(span, span, heads // d.ulysses, masked, lse=True)
                      for masked in ((False, True) if layout.pad else (False,))]
    return calls
