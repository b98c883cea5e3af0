"""The Kandinsky 6 super-resolution stage (``--upscale 1080p``): a video's frames -> frames 2.25x larger, by tiles.

As diffusers' Kandinsky6SRPipeline does it (the reference, tests/test_k6_upscale.py): the 2.25x route pre-upscales
the pixels 1.125x (bilinear, sides snapped to the K-VAE's 16 pixels), lays overlapping tiles over the video (at least
``min_overlap`` shared, 16-pixel aligned), and for each tile: bilinear resize to the trained tile size closest to the
video's aspect ratio, K-VAE encode (posterior mode), variance-preserving noise ``lq_noise_scale`` mixed in (one
generator, the tiles in order), the SR DiT's steps (engine/model/k6_sr.py; [latent, zero anchor, zero mask]) under
the checkpoint's schedule (PiFlow for the distilled 2-step release), K-VAE decode; the decoded tiles are blended with
Hann windows.

Its layout is its own (parallel runs): the tiles are independent, so the ranks of an item group deal them (tile i
to rank i mod n) and each refines and *decodes* its own tiles (the K-VAE decode split per rank, by tiles); the
weighted tiles are summed into the canvas with one reduction. Every rank draws every tile's noise in order (it is
small), so a tile's noise does not depend on which rank refines it. Each rank holds the whole 1.4B SR DiT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from k5.engine.checkpoints.dit import load_k6_sr
from k5.engine.sampling.k6_schedule import Schedule, schedule_from_config

TARGETS = {"1080p": 2.25}  # --upscale name -> total scale (diffusers' resolution_scale; 480x864 -> 1080x1944)
SR_PIPELINE_CLASS = "Kandinsky6SRPipeline"


def is_sr_checkpoint(root: str | Path) -> bool:
    import json

    try:
        return json.loads((Path(root) / "model_index.json").read_text()).get("_class_name") == SR_PIPELINE_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def tile_positions(length: int, tile: int, min_overlap: float, snap: int) -> list[int]:
    """Evenly spread, ``snap``-aligned starts covering [0, length - tile], neighbours sharing >= min_overlap."""
    if tile >= length:
        return [0]
    span = (length - tile) // snap
    max_stride = max(1, math.floor(tile * (1.0 - min_overlap) / snap))
    count = math.ceil(span / max_stride) + 1
    return [round(index * span / (count - 1)) * snap for index in range(count)]


def hann_window_2d(height: int, width: int, device) -> Tensor:
    """A Hann window without its zero ends, so a pixel that one tile alone covers keeps a positive weight."""
    wy = torch.hann_window(height + 2, device=device)[1:-1]
    wx = torch.hann_window(width + 2, device=device)[1:-1]
    return wy[:, None] * wx[None, :]


@dataclass(frozen=True)
class TilePlan:
    scale: float
    tiling_scale: int  # the SR model's own 2x (or 4x)
    size: tuple[int, int]  # (height, width) after the pre-upscale
    base: tuple[int, int]  # the trained tile size the tiles are refined at
    tile: tuple[int, int]  # a tile's size in the (pre-upscaled) input
    grid: tuple[tuple[int, int], ...]  # (top, left) of each tile in the input

    @property
    def out_size(self) -> tuple[int, int]:
        return self.size[0] * self.tiling_scale, self.size[1] * self.tiling_scale


def plan_tiles(height: int, width: int, target: str, tile_sizes, snap: int = 16,
               min_overlap: float = 0.2) -> TilePlan:
    """The tiles of a ``height`` x ``width`` video (diffusers' rules); ValueError for a video the trained tiles
    (``tile_sizes``, pixels at the output) do not fit."""
    scale = TARGETS[target]
    tiling_scale, pre = (2, 1.125) if scale == 2.25 else (int(scale), 1.0)
    size = (round(height * pre / snap) * snap, round(width * pre / snap) * snap) if pre != 1.0 else (height, width)
    h, w = size
    base = tuple(min(tile_sizes, key=lambda hw: abs(hw[1] / hw[0] - w / h)))
    if base[0] % (snap * tiling_scale) or base[1] % (snap * tiling_scale):
        raise ValueError(f"the SR tile size {base} is not a multiple of {snap * tiling_scale} pixels")
    tile = (base[0] // tiling_scale, base[1] // tiling_scale)
    if h < tile[0] or w < tile[1]:
        raise ValueError(f"--upscale {target}: the video is {height}x{width}; the SR model's tiles need at least "
                         f"{math.ceil(tile[0] / pre)}x{math.ceil(tile[1] / pre)} pixels")
    tops = tile_positions(h, tile[0], min_overlap, snap)
    lefts = tile_positions(w, tile[1], min_overlap, snap)
    return TilePlan(scale, tiling_scale, size, base, tile, tuple((t, l) for t in tops for l in lefts))


def checkpoint_tiles(root: str | Path) -> tuple[tuple[tuple[int, int], ...], int]:
    """(the trained tile sizes, the K-VAE's spatial factor) from an SR folder's configs, without loading it."""
    import json

    root = Path(root)
    dit = json.loads((root / "transformer" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    tiles = tuple(tuple(t) for t in dit.get("tile_sizes", ((512, 512), (512, 768), (768, 512))))
    levels = len(vae.get("encoder_block_out_channels", (16, 128, 256, 512, 1024)))
    return tiles, 2 ** (levels - 1)


class SRStage:
    """The SR DiT, the K-VAE and the schedule of a Kandinsky-6.0-VSR-*-Diffusers folder, on ``device``."""

    def __init__(self, dit, vae, root: Path, device, steps: int = 2, lq_noise_scale: float = 0.7,
                 min_overlap: float = 0.2):
        self.dit, self.vae, self.root, self.device = dit, vae, Path(root), torch.device(device)
        self.steps, self.lq_noise_scale, self.min_overlap = steps, lq_noise_scale, min_overlap
        self.snap = vae.spatial_compression_ratio
        self.tile_sizes = tuple(tuple(t) for t in dit.config.tile_sizes)

    @classmethod
    def from_pretrained(cls, root: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu",
                        **kwargs) -> "SRStage":
        from diffusers import Kandinsky6SRVAE

        root = Path(root)
        dit = load_k6_sr(root, dtype, device)
        vae = Kandinsky6SRVAE.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
        return cls(dit, vae.requires_grad_(False), root, device, **kwargs)

    def schedule(self) -> Schedule:
        return schedule_from_config(self.root, self.steps)

    def plan(self, height: int, width: int, target: str = "1080p") -> TilePlan:
        """The tiles of a ``height`` x ``width`` video; ValueError for a video the trained tiles do not fit."""
        return plan_tiles(height, width, target, self.tile_sizes, self.snap, self.min_overlap)

    def to_input(self, frames: Tensor, plan: TilePlan) -> Tensor:
        """uint8 [F, H, W, 3] -> [1, 3, F, h, w] in [-1, 1] at the pre-upscaled size (fp32)."""
        video = (frames.float() / 255.0 * 2.0 - 1.0).permute(3, 0, 1, 2)[None].to(self.device)
        if plan.size != tuple(video.shape[-2:]):
            f = video.permute(0, 2, 1, 3, 4).flatten(0, 1)
            f = F.interpolate(f, size=plan.size, mode="bilinear", align_corners=False)
            video = f.unflatten(0, (1, video.shape[2])).permute(0, 2, 1, 3, 4)
        return video

    def noises(self, plan: TilePlan, num_frames: int, seed: int, upto: int) -> list[Tensor]:
        """The noise of tiles 0..upto, drawn in tile order from one generator (every rank draws the same)."""
        g = torch.Generator("cpu").manual_seed(seed)
        t = (num_frames - 1) // self.vae.temporal_compression_ratio + 1
        shape = (1, t, plan.base[0] // self.snap, plan.base[1] // self.snap, self.dit.config.in_visual_dim)
        return [torch.randn(shape, generator=g, dtype=torch.float32) for _ in range(upto + 1)]

    @torch.no_grad()
    def refine(self, video: Tensor, plan: TilePlan, index: int, noise: Tensor) -> Tensor:
        """Tile ``index`` refined and decoded: [1, 3, F, base_h, base_w] in [-1, 1] (fp32)."""
        top, left = plan.grid[index]
        th, tw = plan.tile
        pixels = video[:, :, :, top: top + th, left: left + tw]
        f = F.interpolate(pixels.permute(0, 2, 1, 3, 4).flatten(0, 1), size=plan.base, mode="bilinear",
                          align_corners=False)
        pixels = f.unflatten(0, (1, video.shape[2])).permute(0, 2, 1, 3, 4)
        # The K-VAE was trained on pixels / 128 - 1, not / 127.5 - 1
        pixels = (pixels.to(self.vae.dtype) + 1) * (127.5 / 128) - 1
        lq = self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor
        lq = lq.permute(0, 2, 3, 4, 1).float()
        s = self.lq_noise_scale
        x = math.sqrt(1 - s ** 2) * lq + s * noise.to(lq.device)
        schedule = self.schedule()
        for i in range(schedule.steps):
            inp = torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[..., :1])], -1)
            t = schedule.timesteps[i].to(x.device).expand(x.shape[0])
            x = schedule.step(i, self.dit(inp, t).float(), x)
        z = x.permute(0, 4, 1, 2, 3).to(self.vae.dtype) / self.vae.config.scaling_factor
        out = self.vae.decode(z).sample
        return ((out.float() + 1) * (128 / 127.5) - 1).clamp(-1, 1)

    def canvas(self, video: Tensor, plan: TilePlan, seed: int, tiles) -> Tensor:
        """The sum of the windowed refined tiles ``tiles`` (indices) over the output canvas [1, 3, F, H', W']."""
        H, W = plan.out_size
        acc = torch.zeros((1, 3, video.shape[2], H, W), device=self.device)
        tiles = list(tiles)
        if not tiles:
            return acc
        noise = self.noises(plan, video.shape[2], seed, max(tiles))
        window = hann_window_2d(*plan.base, self.device)
        bh, bw = plan.base
        for i in tiles:
            top, left = (c * plan.tiling_scale for c in plan.grid[i])
            acc[..., top: top + bh, left: left + bw] += self.refine(video, plan, i, noise[i]) * window
        return acc

    def weights(self, plan: TilePlan) -> Tensor:
        H, W = plan.out_size
        weight = torch.zeros((1, 1, 1, H, W), device=self.device)
        window = hann_window_2d(*plan.base, self.device)
        bh, bw = plan.base
        for top, left in plan.grid:
            top, left = top * plan.tiling_scale, left * plan.tiling_scale
            weight[..., top: top + bh, left: left + bw] += window
        return weight

    def finish(self, acc: Tensor, plan: TilePlan) -> Tensor:
        """The blended canvas -> uint8 frames [F, H', W', 3] (diffusers' postprocess: x / 2 + 0.5, x 255, round)."""
        video = (acc / self.weights(plan)).clamp(-1, 1)
        frames = (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
        return (frames * 255).round().to(torch.uint8).cpu()

    def upscale(self, frames: Tensor, seed: int, target: str = "1080p") -> Tensor:
        """One process: every tile here."""
        plan = self.plan(frames.shape[1], frames.shape[2], target)
        video = self.to_input(frames, plan)
        return self.finish(self.canvas(video, plan, seed, range(len(plan.grid))), plan)
