"""The Kandinsky 5 CrossDiT, single device, plain PyTorch.

Module names equal the checkpoint's tensor names (kandinsky5-architecture.md section 2.9). Numerics follow the
original: time embedding, modulation, norm-scale-shift and gated residuals in fp32; RoPE in fp32, cast to the compute
dtype. Parallelism is applied from outside (k5.parallel) through two attributes of the model:
- ``model.tokens``: how the flat visual token sequence is scattered before the visual blocks and gathered after
  the output projection (identity here);
- ``model.visual_attention``: the visual self-attention op (dense or NABLA on one device here).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k5.kernels.attention import attention
from k5.kernels.nabla import NABLA_P, NABLA_WINDOW, NablaSpec, from_fractal, nabla_attention, to_fractal

from k5.engine.model.config import DiTConfig


def get_freqs(n: int, theta: float = 10000.0) -> Tensor:
    return torch.exp(-math.log(theta) * torch.arange(n, dtype=torch.float32) / n)


def rope_angles_3d(grid: tuple[int, int, int], axes_dims, scale_factor, device) -> Tensor:
    """Per-token rotation angles [T*H*W, head_dim/2] in raster order; positions divided by the resolution scale."""
    T, H, W = grid
    parts = []
    for axis, (n, d, sf) in enumerate(zip(grid, axes_dims, scale_factor)):
        a = torch.arange(n, dtype=torch.float32, device=device)[:, None] * get_freqs(d // 2).to(device)[None] / sf
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        parts.append(a.view(shape).expand(T, H, W, d // 2))
    return torch.cat(parts, -1)


class DeviceTables:
    """Tables a forward needs on the compute device (time frequencies, RoPE cos/sin), built there once per shape and
    device and reused by every later forward. Built from host data at every forward they cost a blocking
    host-to-device copy each (a copy from pageable host memory synchronises the stream): about 11 per CFG step.
    Keeps the ``size`` most recently used entries (a batch job of many shapes does not pile them up)."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, build: Callable[[], object]):
        entry = self._entries.get(key)
        if entry is None:
            # Plain tensors even under inference_mode: a later forward with autograd on may still use them.
            with torch.inference_mode(False), torch.no_grad():
                entry = build()
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry

    def clear(self) -> None:
        self._entries.clear()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B,S,H,D] by angles given as cos/sin [S, D/2] (fp32)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None], sin[:, None]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (F.layer_norm(x.float(), x.shape[-1:]) * (scale + 1.0) + shift).type_as(x)


def gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return (x.float() + gate * y.float()).type_as(x)


@dataclass(frozen=True)
class TokenGrid:
    """The visual token grid of one forward: latent frames, patch rows, patch columns, and the token order."""

    T: int
    H: int
    W: int
    fractal: bool  # 8x8-tile order (NABLA) instead of raster order

    @property
    def num_tokens(self) -> int:
        return self.T * self.H * self.W

    @property
    def blocks(self) -> tuple[int, int, int]:
        return self.T, self.H // 8, self.W // 8


class LocalTokens:
    """Token placement on one device: every token stays here."""

    def scatter(self, x: Tensor, dim: int = 1) -> Tensor:
        return x

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        return x


class LocalAttention:
    """Visual self-attention on one device: dense, or NABLA block-sparse on fractal-ordered tokens."""

    def __init__(self, nabla: NablaSpec | None = None):
        self.nabla = nabla

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        if self.nabla is None:
            return attention(q, k, v)
        return nabla_attention(q, k, v, self.nabla, *grid.blocks)


class Modulation(nn.Module):
    def __init__(self, time_dim: int, dim: int, n: int):
        super().__init__()
        self.n = n
        self.out_layer = nn.Linear(time_dim, n * dim)

    def forward(self, time_embed: Tensor) -> tuple[Tensor, ...]:
        # [B, n*D] fp32 -> n tensors [B, 1, D] in the checkpoint's row order (shift, scale, gate per sublayer)
        return self.out_layer(F.silu(time_embed)).unsqueeze(1).chunk(self.n, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_query = nn.Linear(dim, dim)
        self.to_key = nn.Linear(dim, dim)
        self.to_value = nn.Linear(dim, dim)
        # eps=None: finfo(fp32).eps, since the norms see fp32 inputs
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = nn.Linear(dim, dim)

    def qkv(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        context = x if context is None else context
        q = self.to_query(x).unflatten(-1, (-1, self.head_dim))
        k = self.to_key(context).unflatten(-1, (-1, self.head_dim))
        v = self.to_value(context).unflatten(-1, (-1, self.head_dim))
        q = self.query_norm(q.float()).type_as(q)
        k = self.key_norm(k.float()).type_as(k)
        return q, k, v

    def out(self, o: Tensor) -> Tensor:
        return self.out_layer(o.flatten(-2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(dim, ff_dim, bias=False)
        self.out_layer = nn.Linear(ff_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.gelu(self.in_layer(x)))


class TextBlock(nn.Module):
    """Linguistic token refiner block: self-attention with 1D RoPE and the text key mask, then FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.text_modulation = Modulation(cfg.time_dim, cfg.model_dim, 6)
        self.self_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.feed_forward = FeedForward(cfg.model_dim, cfg.ff_dim)

    def forward(self, x, time_embed, cos, sin, mask):
        shift, scale, gate, ff_shift, ff_scale, ff_gate = self.text_modulation(time_embed)
        q, k, v = self.self_attention.qkv(modulate(x, shift, scale))
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, key_mask=mask)
        x = gated_add(x, gate, self.self_attention.out(o))
        return gated_add(x, ff_gate, self.feed_forward(modulate(x, ff_shift, ff_scale)))


class VisualBlock(nn.Module):
    """CrossDiT block: self-attention (3D RoPE, dense or NABLA) -> cross-attention to text -> FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.visual_modulation = Modulation(cfg.time_dim, cfg.model_dim, 9)
        self.self_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.cross_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.feed_forward = FeedForward(cfg.model_dim, cfg.ff_dim)

    def forward(self, x, text, time_embed, cos, sin, text_mask, self_attn, grid):
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
         ff_shift, ff_scale, ff_gate) = self.visual_modulation(time_embed)
        q, k, v = self.self_attention.qkv(modulate(x, sa_shift, sa_scale))
        o = self_attn(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, grid)
        x = gated_add(x, sa_gate, self.self_attention.out(o))
        # Cross-attention needs only this rank's queries and the (replicated) text: no collective.
        q, k, v = self.cross_attention.qkv(modulate(x, ca_shift, ca_scale), text)
        x = gated_add(x, ca_gate, self.cross_attention.out(attention(q, k, v, key_mask=text_mask)))
        return gated_add(x, ff_gate, self.feed_forward(modulate(x, ff_shift, ff_scale)))


class TimeEmbeddings(nn.Module):
    def __init__(self, model_dim: int, time_dim: int):
        super().__init__()
        self.model_dim = model_dim
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.out_layer = nn.Linear(time_dim, time_dim)
        self.freqs = DeviceTables(2)

    def _device_freqs(self, device) -> Tensor:
        # Computed on the host, as the original computes them, and copied to the device once.
        return get_freqs(self.model_dim // 2).to(device)

    def forward(self, t: Tensor) -> Tensor:
        freqs = self.freqs.get(t.device, lambda: self._device_freqs(t.device))
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], -1)  # cos first
        return self.out_layer(F.silu(self.in_layer(emb)))


class TextEmbeddings(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_layer(x)
        return self.norm(x).type_as(x)


class VisualEmbeddings(nn.Module):
    def __init__(self, in_dim: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = patch
        self.in_layer = nn.Linear(math.prod(patch) * in_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # patch position major, channel minor (the checkpoint's input layout)
        B, T, H, W, C = x.shape
        pt, ph, pw = self.patch
        x = x.view(B, T // pt, pt, H // ph, ph, W // pw, pw, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return self.in_layer(x.flatten(4, 7))


class OutLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.modulation = Modulation(cfg.time_dim, cfg.model_dim, 2)
        self.out_layer = nn.Linear(cfg.model_dim, math.prod(cfg.patch_size) * cfg.out_visual_dim)

    def forward(self, x: Tensor, time_embed: Tensor) -> Tensor:
        shift, scale = self.modulation(time_embed)
        return self.out_layer(modulate(x, shift, scale))


def unpatchify(y: Tensor, patch: tuple[int, int, int], channels: int) -> Tensor:
    # [B,T',H',W', C*pt*ph*pw] with the channel MAJOR (the transpose of the input layout) -> [B,T,H,W,C]
    B, T, H, W, _ = y.shape
    pt, ph, pw = patch
    y = y.view(B, T, H, W, channels, pt, ph, pw).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return y.reshape(B, T * pt, H * ph, W * pw, channels)


class VisualAttentionChoice:
    """The visual self-attention of a DiT (Kandinsky 5's and 6's): dense, or the NablaSpec in ``visual_attention``,
    as the checkpoint's config asks (``config.uses_nabla``, ``attention_P`` and its window, where a config leaves the
    window out the release default of kernels/nabla.py) or as a run chooses."""

    def default_nabla(self, P: float | None = None) -> NablaSpec | None:
        cfg = self.config
        if not cfg.uses_nabla:
            return None
        wT, wH, wW = NABLA_WINDOW
        return NablaSpec(P=cfg.attention_P if P is None else P, wT=cfg.attention_wT or wT,
                         wH=cfg.attention_wH or wH, wW=cfg.attention_wW or wW)

    def set_attention(self, kind: str = "auto", P: float | None = None) -> None:
        """'auto' follows the checkpoint config, else 'dense' or 'nabla' (the config's window, or the default)."""
        if kind == "auto":
            spec = self.default_nabla(P)
        elif kind == "dense":
            spec = None
        elif kind == "nabla":
            base = self.default_nabla() or NablaSpec(P=NABLA_P)
            spec = NablaSpec(P=base.P if P is None else P, wT=base.wT, wH=base.wH, wW=base.wW)
        else:
            raise ValueError(f"attention {kind!r} is not one of 'auto', 'dense', 'nabla'")
        self.visual_attention.nabla = spec

    @property
    def nabla(self) -> NablaSpec | None:
        return self.visual_attention.nabla


class Kandinsky5DiT(VisualAttentionChoice, nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.time_embeddings = TimeEmbeddings(cfg.model_dim, cfg.time_dim)
        self.text_embeddings = TextEmbeddings(cfg.in_text_dim, cfg.model_dim)
        self.pooled_text_embeddings = TextEmbeddings(cfg.in_text_dim2, cfg.time_dim)
        self.visual_embeddings = VisualEmbeddings(cfg.in_channels, cfg.model_dim, cfg.patch_size)
        self.text_transformer_blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.num_text_blocks))
        self.visual_transformer_blocks = nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.num_visual_blocks))
        self.out_layer = OutLayer(cfg)
        self.tokens = LocalTokens()
        self.visual_attention = LocalAttention(self.default_nabla())
        self.lora_adapters = ()  # LoRA adapters merged into the weights (engine/checkpoints/dit.py loads and switches)
        # RoPE cos/sin on the device: text ones per text length (an edit's two prompts differ), visual ones per grid.
        self.text_rope, self.visual_rope = DeviceTables(4), DeviceTables(2)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_embeddings.in_layer.weight.dtype

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half(): tables of the old placement must not stay on a device the model left (offload).
        for tables in (self.text_rope, self.visual_rope, self.time_embeddings.freqs):
            tables.clear()
        return super()._apply(fn, recurse)

    def _text_rope(self, length: int, device) -> tuple[Tensor, Tensor]:
        angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * \
            get_freqs(self.config.head_dim // 2).to(device)[None]
        return angles.cos(), angles.sin()

    def _visual_rope(self, grid: TokenGrid, scale_factor, device) -> tuple[Tensor, Tensor]:
        """cos/sin of this rank's visual tokens, in the token order and sharding of the forward."""
        angles = rope_angles_3d((grid.T, grid.H, grid.W), self.config.axes_dims, scale_factor, device)
        angles = to_fractal(angles[None])[0] if grid.fractal else angles.flatten(0, 2)
        angles = self.tokens.scatter(angles, dim=0)
        return angles.cos(), angles.sin()

    def forward(self, x: Tensor, text_embeds: Tensor, pooled_embeds: Tensor, timestep: Tensor,
                scale_factor: tuple[float, float, float] = (1.0, 2.0, 2.0), text_mask: Tensor | None = None,
                visual_stack: Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor] | None = None) -> Tensor:
        """Velocity [B,T,H,W,16] for channels-last latents x [B,T,H,W,C_in] at timesteps (sigma*1000, fp32) [B].

        ``visual_stack(visual, run)`` replaces running the visual blocks on this rank's tokens (``run(visual)``
        runs them): a step cache returns ``visual`` plus a cached residual instead. The text blocks before it and
        the output layer after it always run.
        """
        cfg = self.config
        B, T, H, W, C = x.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_channels:
            raise ValueError(f"latent has {C} channels, the DiT expects {cfg.in_channels}")
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent grid {(T, H, W)} is not divisible by the patch size {cfg.patch_size}")
        dtype = self.dtype
        timestep = torch.as_tensor(timestep, device=x.device).float().reshape(-1).expand(B)

        # The fp32 CLIP vector is rounded to the compute dtype at the Linear's input, as the original's bf16 autocast
        # does; the sum with the fp32 time embedding is fp32 there too.
        time_embed = self.time_embeddings(timestep) + self.pooled_text_embeddings(pooled_embeds.to(dtype)).float()
        text = self.text_embeddings(text_embeds.to(dtype))
        # A mask without padding is the caller's to drop (the pipeline does, once per item): checking it here would
        # be a device sync in every forward.
        cos, sin = self.text_rope.get((text.shape[1], x.device), lambda: self._text_rope(text.shape[1], x.device))
        for block in self.text_transformer_blocks:
            text = block(text, time_embed, cos, sin, text_mask)

        grid = TokenGrid(T // pt, H // ph, W // pw, fractal=self.nabla is not None)
        if grid.fractal and (grid.H % 8 or grid.W % 8):
            raise ValueError(
                f"NABLA needs latent height and width divisible by 16 (pixel sizes by 128); got a latent of "
                f"{H}x{W}: use another size or --attention dense"
            )
        visual = self.visual_embeddings(x.to(dtype))
        visual = to_fractal(visual) if grid.fractal else visual.flatten(1, 3)
        visual = self.tokens.scatter(visual)  # first: it fixes the layout that the angles are sharded by
        key = (grid, tuple(scale_factor), x.device, self.tokens)
        cos, sin = self.visual_rope.get(key, lambda: self._visual_rope(grid, scale_factor, x.device))

        def run(visual: Tensor) -> Tensor:
            for block in self.visual_transformer_blocks:
                visual = block(visual, text, time_embed, cos, sin, text_mask, self.visual_attention, grid)
            return visual

        visual = run(visual) if visual_stack is None else visual_stack(visual, run)

        # The output projection is per token, so it runs before the gather: ranks exchange 64 channels, not D.
        out = self.tokens.gather(self.out_layer(visual, time_embed))
        if grid.fractal:
            out = from_fractal(out, grid.T, grid.H, grid.W)
        else:
            out = out.unflatten(1, (grid.T, grid.H, grid.W))
        return unpatchify(out, cfg.patch_size, cfg.out_visual_dim)


def meta_dit(config: DiTConfig) -> Kandinsky5DiT:
    """The DiT of ``config`` on the meta device: its structure and shapes with no memory behind them (parameter
    counts, LoRA shape checks, memory estimates)."""
    with torch.device("meta"):
        return Kandinsky5DiT(config)
