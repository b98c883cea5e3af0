"""VAE decode split across ranks: whole tiles dealt to ranks, gathered once, blended as the library blends them.

In the official multi-GPU path every rank decodes the whole video. Sharding rows with halo exchange does not work
for this VAE: its mid block attends over all tokens of a window with a frame-causal mask, so a row shard needs every
other row (distributed-dit-anchors.md section 4). Whole tiles do work: diffusers' tiled decode already decodes
overlapping tiles independently and only blends them afterwards, so the tiles can be decoded anywhere.

The tiles are those of `AutoencoderKLHunyuanVideo._decode`: temporal windows (`_temporal_tiled_decode`) when the
latent has more frames than a window, each split into spatial tiles (`tiled_decode`) when spatial tiling is on and
the latent is larger than a tile. Every rank computes the same plan from the shape and the VAE's tile settings,
decodes its share with the library's own per-tile calls (post_quant_conv, then decoder), and the decoded tiles
travel in one collective: each rank packs its tiles into one flat buffer, padded to the largest rank's size, which
every rank knows from the plan. The blend runs on the receiving rank(s) with the library's blend_v/blend_h/blend_t,
in the library's order and with its in-place updates, so the result equals the single-process tiled decode.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from typing import TYPE_CHECKING

from k5.engine.memory import PEAKS
from k5.engine.vae.video import VideoVAE, frames_to_uint8, vae_input

if TYPE_CHECKING:  # only annotations: importing this module needs no diffusers
    from diffusers import AutoencoderKLHunyuanVideo


@dataclass(frozen=True)
class Tile:
    """One decoder call: the latent slice [t0:t1, h0:h1, w0:w1] of temporal window `window`, spatial tile (row, col).

    `drop_first`: the library drops the first decoded frame of every window after the first (it duplicates the last
    frame of the previous window's overlap). `cost` is the decoded volume (frames x latent pixels), which is what
    the decoder's convolutions scale with; edge tiles are cut short and cost less.
    """

    index: int
    window: int
    row: int
    col: int
    t: tuple[int, int]
    h: tuple[int, int]
    w: tuple[int, int]
    drop_first: bool
    cost: int


@dataclass(frozen=True)
class _Layout:
    windows: list[tuple[int, int]]  # latent frame ranges; one window covering all frames when not temporal
    rows: list[tuple[int, int]]
    cols: list[tuple[int, int]]
    temporal: bool
    spatial: bool


def _autoencoder(vae: VideoVAE | AutoencoderKLHunyuanVideo) -> AutoencoderKLHunyuanVideo:
    return vae.vae if isinstance(vae, VideoVAE) else vae


def _latent_thw(latent_shape) -> tuple[int, int, int]:
    shape = tuple(latent_shape)
    if len(shape) == 5:  # channels-last [B, T, H, W, C], as the DiT produces
        return shape[1], shape[2], shape[3]
    if len(shape) == 3:
        return shape
    raise ValueError(f"expected a latent shape [B, T, H, W, C] or (T, H, W), got {shape}")


def _layout(latent_shape, ae: AutoencoderKLHunyuanVideo) -> _Layout:
    """The windows and spatial tiles of `_decode`, with the same conditions and integer arithmetic."""
    num_frames, height, width = _latent_thw(latent_shape)
    s, r = ae.spatial_compression_ratio, ae.temporal_compression_ratio
    min_h, min_w = ae.tile_sample_min_height // s, ae.tile_sample_min_width // s
    stride_h, stride_w = ae.tile_sample_stride_height // s, ae.tile_sample_stride_width // s
    min_t, stride_t = ae.tile_sample_min_num_frames // r, ae.tile_sample_stride_num_frames // r

    temporal = ae.use_framewise_decoding and num_frames > min_t
    if temporal:  # each window takes one latent frame more than its stride share: the causal context frame
        windows = [(i, min(i + min_t + 1, num_frames)) for i in range(0, num_frames, stride_t)]
    else:
        windows = [(0, num_frames)]
    spatial = ae.use_tiling and (width > min_w or height > min_h)
    if spatial:
        rows = [(i, min(i + min_h, height)) for i in range(0, height, stride_h)]
        cols = [(j, min(j + min_w, width)) for j in range(0, width, stride_w)]
    else:
        rows, cols = [(0, height)], [(0, width)]
    return _Layout(windows, rows, cols, temporal, spatial)


def plan_tiles(latent_shape, vae: VideoVAE | AutoencoderKLHunyuanVideo) -> list[Tile]:
    """All decoder calls of the library's decode of a latent of this shape, in the library's order.

    Depends only on the shape and the VAE's tiling settings, so every rank computes the same plan alone.
    """
    ae = _autoencoder(vae)
    lay = _layout(latent_shape, ae)
    r = ae.temporal_compression_ratio
    tiles = []
    for k, (t0, t1) in enumerate(lay.windows):
        frames = (t1 - t0 - 1) * r + 1 - (k > 0)
        for i, (h0, h1) in enumerate(lay.rows):
            for j, (w0, w1) in enumerate(lay.cols):
                tiles.append(Tile(
                    index=len(tiles), window=k, row=i, col=j, t=(t0, t1), h=(h0, h1), w=(w0, w1),
                    drop_first=k > 0, cost=frames * (h1 - h0) * (w1 - w0),
                ))
    return tiles


def assign_tiles(tiles: list[Tile], world_size: int) -> list[list[int]]:
    """Deal tiles to ranks by work: longest processing time first, each to the least-loaded rank.

    Ties go to the lower tile index and the lower rank, so the result is a pure function of the plan. Each rank's
    list is in tile order. With fewer tiles than ranks the last ranks get nothing.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for tile in sorted(tiles, key=lambda t: (-t.cost, t.index)):
        rank = min(range(world_size), key=lambda q: (loads[q], q))
        loads[rank] += tile.cost
        owned[rank].append(tile.index)
    return [sorted(ids) for ids in owned]


def decoded_shape(tile: Tile, ae: AutoencoderKLHunyuanVideo, batch: int) -> tuple[int, ...]:
    """[B, C, F, H, W] of a tile after decode and the first-frame drop; the decoder's geometry is fixed."""
    s, r = ae.spatial_compression_ratio, ae.temporal_compression_ratio
    frames = (tile.t[1] - tile.t[0] - 1) * r + 1 - tile.drop_first
    return (batch, ae.config.out_channels, frames, (tile.h[1] - tile.h[0]) * s, (tile.w[1] - tile.w[0]) * s)


def decode_tile(ae: AutoencoderKLHunyuanVideo, z: torch.Tensor, tile: Tile) -> torch.Tensor:
    """The library's per-tile calls on the same slice of z [B, C, T, H, W]."""
    x = z[:, :, tile.t[0] : tile.t[1], tile.h[0] : tile.h[1], tile.w[0] : tile.w[1]]
    decoded = ae.decoder(ae.post_quant_conv(x))
    # The library drops this frame after the spatial blend; blends are per frame, so dropping it first is exact
    # and saves sending it.
    return decoded[:, :, 1:] if tile.drop_first else decoded


def _blend(ae: AutoencoderKLHunyuanVideo, lay: _Layout, decoded: dict[int, torch.Tensor], shape) -> torch.Tensor:
    """Assemble decoded tiles exactly as `tiled_decode` then `_temporal_tiled_decode` do (same calls, same order,
    same in-place updates of the neighbours they read)."""
    num_frames, height, width = _latent_thw(shape)
    s = ae.spatial_compression_ratio
    per_window = len(lay.rows) * len(lay.cols)
    windows = []
    for k in range(len(lay.windows)):
        rows = [[decoded[k * per_window + i * len(lay.cols) + j] for j in range(len(lay.cols))]
                for i in range(len(lay.rows))]
        if not lay.spatial:
            windows.append(rows[0][0])
            continue
        blend_height = ae.tile_sample_min_height - ae.tile_sample_stride_height
        blend_width = ae.tile_sample_min_width - ae.tile_sample_stride_width
        result_rows = []
        for i, row in enumerate(rows):
            result_row = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = ae.blend_v(rows[i - 1][j], tile, blend_height)
                if j > 0:
                    tile = ae.blend_h(row[j - 1], tile, blend_width)
                result_row.append(tile[:, :, :, : ae.tile_sample_stride_height, : ae.tile_sample_stride_width])
            result_rows.append(torch.cat(result_row, dim=-1))
        windows.append(torch.cat(result_rows, dim=3)[:, :, :, : height * s, : width * s])
    if not lay.temporal:
        return windows[0]
    blend_frames = ae.tile_sample_min_num_frames - ae.tile_sample_stride_num_frames
    stride = ae.tile_sample_stride_num_frames
    result = []
    for k, tile in enumerate(windows):
        if k > 0:
            tile = ae.blend_t(windows[k - 1], tile, blend_frames)
            result.append(tile[:, :, :stride])
        else:
            result.append(tile[:, :, : stride + 1])
    return torch.cat(result, dim=2)[:, :, : (num_frames - 1) * ae.temporal_compression_ratio + 1]


@dataclass
class DecodeStats:
    """What one rank did in `parallel_decode`.

    `peak_bytes` is the CUDA peak allocated over the decode (peak_kind "cuda_max_allocated", measured as the
    "decode" phase of engine.memory.PEAKS, which keeps the run's peak from before it), or on CPU the bytes of decoded pixels this rank held at once: its packed
    tiles, plus on a blending rank the receive buffers and the assembled video (peak_kind "cpu_tile_buffers";
    decoder activations not included).
    `rss_peak_bytes` is the process's peak resident set size since it started (Linux ru_maxrss), not the decode's.
    """

    rank: int
    world_size: int
    tiles: list[int]
    num_tiles: int
    work: int
    total_work: int
    decode_s: float = 0.0
    gather_s: float = 0.0
    blend_s: float = 0.0
    sent_bytes: int = 0
    peak_bytes: int = 0
    peak_kind: str = ""
    rss_peak_bytes: int = 0
    blended: bool = False

    def summary(self) -> str:
        return (
            f"vae rank {self.rank}/{self.world_size}: {len(self.tiles)}/{self.num_tiles} tiles, "
            f"work {self.work / max(self.total_work, 1):.0%}, decode {self.decode_s:.2f}s gather {self.gather_s:.2f}s "
            f"blend {self.blend_s:.2f}s, peak {self.peak_bytes / 2**20:.1f} MiB ({self.peak_kind})"
        )


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@torch.no_grad()
def parallel_decode(
    vae: VideoVAE | AutoencoderKLHunyuanVideo, latents: torch.Tensor, group=None, dst: int | None = 0,
    to_uint8: bool = True,
) -> tuple[torch.Tensor | None, DecodeStats]:
    """Decode DiT latents [B, T, H, W, 16] with the tiles dealt across the ranks of `group`.

    Every rank of `group` must call this with the same latents and VAE settings. The frames (uint8
    [B, F, 8H, 8W, 3], or the float decode [B, 3, F, 8H, 8W] with `to_uint8=False`) come back on group rank `dst`
    and None elsewhere; `dst=None` gives them to every rank (all-gather instead of gather). Equal to the
    single-process `vae.decode` with the same tiling: each tile goes through the same ops on the same slice and
    the blend repeats the library's (bitwise equal in the tests). Each tile holds the whole batch; with
    `use_slicing` and B > 1 the library decodes per video instead, equal up to batched-kernel rounding.
    """
    ae = _autoencoder(vae)
    rank, world = _group_info(group)
    if dst is not None and not 0 <= dst < world:
        raise ValueError(f"dst={dst} is not a rank of a group of {world}; use 0..{world - 1} or None for all ranks")
    z = vae_input(latents, ae)
    tiles = plan_tiles(latents.shape, ae)
    owned = assign_tiles(tiles, world)
    batch = z.shape[0]
    numel = [math.prod(decoded_shape(t, ae, batch)) for t in tiles]
    rank_numel = [sum(numel[i] for i in ids) for ids in owned]
    capacity = max(rank_numel)
    on_cuda = z.is_cuda
    with PEAKS.phase("decode", z.device) as phase:
        frames, stats = _decode_and_gather(ae, z, latents, tiles, owned, numel, capacity, rank, world, group, dst,
                                           to_uint8)
    if phase is not None:
        stats.peak_bytes = phase.allocated
    stats.peak_kind = "cuda_max_allocated" if on_cuda else "cpu_tile_buffers"
    stats.rss_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return frames, stats


def _decode_and_gather(ae, z, latents, tiles, owned, numel, capacity, rank, world, group, dst, to_uint8):
    batch, on_cuda = z.shape[0], z.is_cuda
    stats = DecodeStats(
        rank=rank, world_size=world, tiles=owned[rank], num_tiles=len(tiles),
        work=sum(tiles[i].cost for i in owned[rank]), total_work=sum(t.cost for t in tiles),
    )

    start = time.perf_counter()
    send = torch.zeros(capacity, dtype=ae.dtype, device=z.device)  # idle ranks send padding only
    offset = 0
    for i in owned[rank]:
        decoded = decode_tile(ae, z, tiles[i])
        expected = decoded_shape(tiles[i], ae, batch)
        if tuple(decoded.shape) != expected:
            raise RuntimeError(
                f"tile {i} decoded to {tuple(decoded.shape)}, the plan expects {expected}: this decoder does not "
                f"have the HunyuanVideo geometry (F = 4(T-1)+1, 8x spatial) that parallel_decode assumes"
            )
        send[offset : offset + numel[i]].copy_(decoded.reshape(-1))
        offset += numel[i]
        del decoded
    if on_cuda:
        torch.cuda.synchronize(z.device)
    stats.decode_s = time.perf_counter() - start
    stats.sent_bytes = send.numel() * send.element_size() if world > 1 else 0

    start = time.perf_counter()
    receives = dst is None or rank == dst
    if world == 1:
        buffers = [send]
    elif dst is None:
        gathered = torch.empty(world * capacity, dtype=send.dtype, device=send.device)
        # all_gather_single is the torch >= 2.13 name of all_gather_into_tensor (deprecated there)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(gathered, send, group=group)
        buffers = list(gathered.chunk(world))
    else:
        buffers = [torch.empty_like(send) for _ in range(world)] if receives else None
        dist.gather(send, buffers, group=group, group_dst=dst)
    if on_cuda:
        torch.cuda.synchronize(z.device)
    stats.gather_s = time.perf_counter() - start
    held = (send.numel() + (world * capacity if receives and world > 1 else 0)) * send.element_size()

    frames = None
    if receives:
        start = time.perf_counter()
        decoded = {}
        for r, ids in enumerate(owned):
            offset = 0
            for i in ids:
                decoded[i] = buffers[r][offset : offset + numel[i]].view(decoded_shape(tiles[i], ae, batch))
                offset += numel[i]
        video = _blend(ae, _layout(latents.shape, ae), decoded, latents.shape)
        held += video.numel() * video.element_size()
        frames = frames_to_uint8(video) if to_uint8 else video
        stats.blend_s = time.perf_counter() - start
        stats.blended = True
    stats.peak_bytes = held  # replaced by the measured peak on CUDA
    return frames, stats


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_MAX_DIMS = 6


def broadcast_image_latent(
    latent: torch.Tensor | None, group=None, src: int = 0, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Share the I2V image latent encoded once on group rank `src` with every rank of `group`.

    Other ranks may pass None: the shape and dtype travel first in a small header. `device` is where non-src ranks
    receive (default: the current CUDA device under NCCL, else CPU).
    """
    rank, world = _group_info(group)
    if rank == src:
        if latent is None:
            raise ValueError(f"rank {src} is the source and must pass the image latent")
        if latent.dtype not in _DTYPES or latent.ndim > _MAX_DIMS:
            raise ValueError(f"cannot broadcast a {latent.dtype} tensor of {latent.ndim} dims")
        if world == 1:
            return latent
        device = latent.device
    elif device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    if rank == src:
        header[0], header[1] = latent.ndim, _DTYPES.index(latent.dtype)
        header[2 : 2 + latent.ndim] = torch.tensor(latent.shape)
    dist.broadcast(header, group=group, group_src=src)
    ndim, code = int(header[0]), int(header[1])
    out = latent.contiguous() if rank == src else torch.empty(
        header[2 : 2 + ndim].tolist(), dtype=_DTYPES[code], device=device
    )
    dist.broadcast(out, group=group, group_src=src)
    return out
