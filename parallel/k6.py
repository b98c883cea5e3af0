"""Kandinsky 6's DiT on every parallel layout of k5: sequence (Ulysses, ring, both), tensor, CFG.

The video tokens are split over the sequence-parallel ranks exactly as Kandinsky 5's (parallel/sequence.py: shards
of whole 64-token blocks, NABLA order when NABLA is on, padded at the end). The audio tokens are *replicated*: every
SP rank holds all of them and runs the audio stream's sub-layers whole. Why, in numbers for Pro, 5 s at 480x864
(121 frames; 8 SP ranks):
- size: 50,220 video tokens, 218 audio tokens (0.4 %), and the audio stream is half as wide (2048 vs 4096, FFN
  7168 vs 16384): per block the audio stream's linear layers cost about 0.1 % of the video's, so running them on
  every rank adds about 1 % to a rank's 1/8 share;
- communication when replicated: one attention needs the other stream's tokens from every rank, ``av`` (audio
  queries over all video tokens). Each rank attends its audio queries to its own video shard and the partial
  results (output and log-sum-exp, fp32, 218 x 2048 values: 1.8 MB per rank and block) are all-gathered over the SP
  group and merged; Ulysses alone moves about 200 MB per rank and block (four all-to-alls of 6,278 x 4096 bf16).
  ``va`` (video queries over the audio) needs nothing: every rank has all the audio keys;
- communication when split: ``av`` would need every video token's key and value on every rank (an all-gather of
  0.8 GB per block, or a second ring over them), the audio self-attention its own all-to-all or ring over 27-token
  shards (latency-bound), ``va`` an all-gather of the audio keys.
So the audio is replicated, and it stays bitwise identical on every rank: all ranks merge the same gathered partials
in the same (rank) order. Tensor parallelism cuts both streams' blocks by whole heads (parallel/tensor.py's plan,
which names the cross-modal layers too); CFG parallelism exchanges both streams' predictions in one all-gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from k5.engine.sampling.chain import Conditioning, combine_cfg, uses_cfg
from k5.engine.checkpoints.dit import load_k6_dit
from k5.engine.model.k6_dit import Kandinsky6DiT
from k5.engine.sampling.k6_sampler import guided_forward
from k5.kernels.attention import dense_attention
from k5.kernels.merge import merge_all
from k5.parallel.cfg import COND, UNCOND
from k5.parallel.comm_stats import CommStats
from k5.parallel.mesh import LayoutError, ParallelDims, check_tp_degree
from k5.parallel.sequence import SequenceShards, ShardedAttention
from k5.parallel.tensor import apply_tensor_parallel, tp_reader
from k5.parallel.usp import SequenceParallelAttention


class AudioOverVideoShards:
    """The ``av`` attention with the video tokens sharded: this rank's audio queries (all of them) over its video
    shard, pad keys masked, then the partial results of all SP ranks merged through their log-sum-exp."""

    def __init__(self, shards: SequenceShards, dims: ParallelDims, stats: CommStats):
        self.shards, self.dims, self.stats = shards, dims, stats

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        layout, n = self.shards.layout, self.dims.sp_size
        valid = layout.token_valid(self.dims.sp_rank * layout.shard_len, layout.shard_len, k.device)
        key_mask = None if layout.pad == 0 else valid[None].expand(k.shape[0], -1)
        out, lse = dense_attention(q, k, v, key_mask)  # a shard of pad only: (0, -inf), the merge's identity
        out = out.float().contiguous()
        outs, lses = [torch.empty_like(out) for _ in range(n)], [torch.empty_like(lse) for _ in range(n)]
        dist.all_gather(outs, out, group=self.dims.sp_group)
        dist.all_gather(lses, lse.contiguous(), group=self.dims.sp_group)
        self.stats.all_gather(out, n)
        self.stats.all_gather(lse, n)
        return merge_all(zip(outs, lses))[0].to(q.dtype)


def apply_sequence_parallel(dit: Kandinsky6DiT, dims: ParallelDims, stats: CommStats | None = None) -> CommStats:
    """Split ``dit``'s video tokens over ``dims``' ring x ulysses ranks (mesh already built), audio replicated."""
    dims.check_heads(dit.config.num_heads // dims.tp)  # Ulysses splits the video heads; the audio is not split
    stats = stats if stats is not None else CommStats()
    shards = SequenceShards(dims, stats)
    dit.tokens = shards
    dit.visual_attention = ShardedAttention(SequenceParallelAttention(dims, stats), shards, dit.nabla)
    dit.audio_from_video = AudioOverVideoShards(shards, dims, stats)
    return stats


def check_tensor_parallel(dit_config, tp: int) -> None:
    """Both streams' heads and FFN widths must cut into ``tp`` equal parts."""
    for stream in (dit_config.video, dit_config.audio):
        check_tp_degree(stream.num_heads, stream.ff_dim, tp)


def load_rank_k6_dit(path, dims: ParallelDims, dtype: torch.dtype = torch.bfloat16, device="cpu",
                     stats: CommStats | None = None) -> tuple[Kandinsky6DiT, CommStats]:
    """Build on meta, cut both streams for this rank's tp shard, fill with this rank's slices only."""
    stats = stats if stats is not None else CommStats()

    def prepare(model: Kandinsky6DiT) -> None:
        check_tensor_parallel(model.config, dims.tp)
        apply_tensor_parallel(model, dims, stats)

    return load_k6_dit(path, dtype, device, reader=tp_reader(dims), prepare=prepare), stats


class CfgParallel:
    """CFG parallelism for ``engine.sampling.k6_sampler.sample(guided=...)``: cfg half 0 runs the conditional forward, half
    1 the unconditional one; both streams' predictions travel in one all-gather, and both halves combine them with
    the sequential sampler's arithmetic, so the latents stay identical everywhere. The object itself is the stage
    Kandinsky6Pipeline.generate takes in its ``chain`` (calling it is ``guided``)."""

    def __init__(self, dims: ParallelDims, stats: CommStats | None = None):
        if dims.cfg != 2:
            raise LayoutError(f"CFG parallelism needs a cfg mesh dim of size 2, got {dims.cfg}", dims.degrees)
        self.group, self.branch = dims.group("cfg"), dims.rank("cfg")
        self.stats = stats if stats is not None else CommStats()

    def guided(self, forward, inp: Tensor, audio: Tensor | None, t: Tensor, cond: Conditioning,
               uncond: Conditioning | None, guidance_scale: float, **kwargs) -> tuple[Tensor, Tensor | None]:
        if uncond is None or not uses_cfg(guidance_scale):
            return guided_forward(forward, inp, audio, t, cond, None, guidance_scale, **kwargs)
        c = cond if self.branch == COND else uncond
        v, a = forward(inp, audio, c.embeds, c.pooled, t, text_mask=c.mask, **kwargs)
        own = torch.cat([v.float().flatten(), a.float().flatten() if a is not None else v.new_zeros(0)])
        parts = [torch.empty_like(own) for _ in range(2)]
        dist.all_gather(parts, own, group=self.group)
        self.stats.all_gather(own, 2)
        def split(p: Tensor) -> tuple[Tensor, Tensor | None]:
            return p[: v.numel()].view(v.shape), (p[v.numel():].view(a.shape) if a is not None else None)

        (vc, ac), (vu, au) = split(parts[COND]), split(parts[UNCOND])
        return combine_cfg(vc, vu, guidance_scale), (combine_cfg(ac, au, guidance_scale) if a is not None else None)

    __call__ = guided


def build_k6_parallel(checkpoint, dims: ParallelDims, *, dtype: torch.dtype = torch.bfloat16, device="cpu",
                      keep_text: bool = False, audio: bool = True, config=None):
    """Everything a rank needs to generate Kandinsky 6 on the planned ``dims`` (k5.parallel.plan.plan_parallel), as
    k5.parallel.plan.build_parallel does for Kandinsky 5: the mesh, this rank's DiT slices (tp over both streams),
    the video tokens split over ring x ulysses with the audio replicated, the text encoders on one rank per replica
    (its embeddings broadcast; per cfg half with CFG parallelism), the VAE on every rank (the tiled decode), the
    I2AV image encoded once per item group, and the audio decoder on the item group's rank 0 only (it writes the
    file). ``checkpoint``: a checked Checkpoint of a Kandinsky 6 folder. Returns a k5.parallel.plan.ParallelSetup."""
    from k5.engine.encoders.text import TextEncoder
    from k5.engine.pipelines.k6 import Kandinsky6Pipeline
    from k5.engine.pipelines.video import Sharing
    from k5.parallel.cfg import BranchText
    from k5.parallel.plan import ParallelSetup, image_sharing
    from k5.parallel.tensor import parameter_bytes
    from k5.parallel.text_share import SharedText, is_text_source

    device = torch.device(device)
    if dims.world_size == 1:
        pipe = Kandinsky6Pipeline.from_pretrained(checkpoint, dtype, device, audio=audio, config=config)
        return ParallelSetup(dims, pipe, [], None, parameter_bytes(pipe.dit))
    if not dist.is_initialized():
        raise RuntimeError(f"a layout of {dims.world_size} ranks needs torch.distributed initialized")
    check_tensor_parallel(config or checkpoint.dit.config, dims.tp)
    dims.check_heads((config or checkpoint.dit.config).num_heads // dims.tp)
    dims.build_mesh(device.type)
    stats = CommStats()

    def prepare(model: Kandinsky6DiT) -> None:
        apply_tensor_parallel(model, dims, stats)

    dit = load_k6_dit(checkpoint.dit, dtype, device, config=config, reader=tp_reader(dims), prepare=prepare)
    if dims.sp_size > 1:
        apply_sequence_parallel(dit, dims, stats)
    encoder = TextEncoder.from_pretrained(checkpoint.root, torch_dtype=dtype, device=device) \
        if is_text_source(dims) else None
    text = SharedText.for_dims(encoder, dims, device, keep=keep_text, stats=stats)
    if dims.cfg == 2:
        text = BranchText(text, dims)
    pipe = Kandinsky6Pipeline.from_pretrained(checkpoint, dtype, device, dit=dit, text=text, audio=audio,
                                              audio_decoder=dims.rank("item") == 0,
                                              sharing=Sharing(image=image_sharing(dims, device)))
    stages = [CfgParallel(dims, stats)] if dims.cfg == 2 else []
    return ParallelSetup(dims, pipe, stages, stats, parameter_bytes(dit))
