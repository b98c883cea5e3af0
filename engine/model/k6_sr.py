"""The Kandinsky 6 super-resolution DiT (1.4B), single device, plain PyTorch.

A text-free Kandinsky 5 visual stack: every block is self-attention and FFN under adaLN modulation (six parameters,
no cross-attention). Its time embedding gets a learned constant instead of a pooled text vector (``pooled_bias``:
the CLIP projection of the empty caption it was trained with, folded in by the checkpoint conversion). It refines
tiles of the K-VAE latent (64 channels, patch 1x1x1) given as [noisy latent, anchor latent, anchor mask]; the
distilled checkpoint's output is PiFlow-widened (n_grid x 64 channels).

Its self-attention is NABLA by default, as in every release: the tokens in 8x8-tile order (kernels/nabla.py, the
same order as the reference's ``_local_patch``), each query tile attending to the key tiles that carry the top
``nabla_threshold`` of the pooled attention mass plus the sliding-tile window ``nabla_window`` (in tiles). Module
names are the original's (engine/checkpoints/state_dict.py maps diffusers' time embedding and FFN names onto them), so the
blocks are engine.model.dit's. ``model.tokens`` and ``model.visual_attention`` are the parallel hooks, as for the DiTs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from k5.kernels.nabla import NablaSpec, from_fractal, to_fractal

from k5.engine.model.dit import (Attention, FeedForward, LocalAttention, LocalTokens, Modulation, OutLayer,
                                 TimeEmbeddings, TokenGrid, VisualEmbeddings, apply_rope, gated_add, modulate,
                                 rope_angles_3d, unpatchify)
from k5.engine.model.k6_config import SRConfig


class SRBlock(nn.Module):
    def __init__(self, cfg: SRConfig):
        super().__init__()
        self.visual_modulation = Modulation(cfg.time_dim, cfg.model_dim, 6)
        self.self_attention = Attention(cfg.model_dim, cfg.head_dim)
        self.feed_forward = FeedForward(cfg.model_dim, cfg.ff_dim)

    def forward(self, x, time_embed, cos, sin, self_attn, grid):
        sa_shift, sa_scale, sa_gate, ff_shift, ff_scale, ff_gate = self.visual_modulation(time_embed)
        q, k, v = self.self_attention.qkv(modulate(x, sa_shift, sa_scale))
        x = gated_add(x, sa_gate, self.self_attention.out(self_attn(apply_rope(q, cos, sin), apply_rope(k, cos, sin),
                                                                    v, grid)))
        return gated_add(x, ff_gate, self.feed_forward(modulate(x, ff_shift, ff_scale)))


class Kandinsky6SR(nn.Module):
    def __init__(self, cfg: SRConfig):
        super().__init__()
        self.config = cfg
        self.time_embeddings = TimeEmbeddings(cfg.model_dim, cfg.time_dim)
        self.pooled_bias = nn.Parameter(torch.zeros(cfg.time_dim))
        self.visual_embeddings = VisualEmbeddings(cfg.in_channels, cfg.model_dim, cfg.patch_size)
        self.visual_transformer_blocks = nn.ModuleList(SRBlock(cfg) for _ in range(cfg.num_visual_blocks))
        self.out_layer = OutLayer(cfg)
        self.tokens = LocalTokens()
        self.visual_attention = LocalAttention(self.default_nabla())

    def default_nabla(self) -> NablaSpec | None:
        cfg = self.config
        if cfg.attention_type != "nabla":
            return None
        return NablaSpec(P=cfg.nabla_threshold, wT=cfg.nabla_window[0], wH=cfg.nabla_window[1],
                         wW=cfg.nabla_window[2])

    @property
    def nabla(self) -> NablaSpec | None:
        return self.visual_attention.nabla

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_embeddings.in_layer.weight.dtype

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        """Prediction [B,T,H,W,out_visual_dim] for latent tiles x [B,T,H,W,2*in+1] at timesteps (sigma*1000) [B]."""
        cfg = self.config
        B, T, H, W, C = x.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_channels:
            raise ValueError(f"latent has {C} channels, the SR DiT expects {cfg.in_channels} (latent, anchor, mask)")
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent grid {(T, H, W)} is not divisible by the patch size {cfg.patch_size}")
        grid = TokenGrid(T // pt, H // ph, W // pw, fractal=self.nabla is not None)
        if grid.fractal and (grid.H % 8 or grid.W % 8):
            raise ValueError(f"NABLA needs the SR token grid {grid.H}x{grid.W} divisible by 8")
        timestep = torch.as_tensor(timestep, device=x.device).float().reshape(-1).expand(B)
        time_embed = self.time_embeddings(timestep) + self.pooled_bias.float()

        visual = self.visual_embeddings(x.to(self.dtype))
        angles = rope_angles_3d((grid.T, grid.H, grid.W), cfg.axes_dims, cfg.scale_factor, x.device)
        if grid.fractal:
            visual, angles = to_fractal(visual), to_fractal(angles[None])[0]
        else:
            visual, angles = visual.flatten(1, 3), angles.flatten(0, 2)
        visual = self.tokens.scatter(visual)
        angles = self.tokens.scatter(angles, dim=0)
        cos, sin = angles.cos(), angles.sin()
        for block in self.visual_transformer_blocks:
            visual = block(visual, time_embed, cos, sin, self.visual_attention, grid)

        out = self.tokens.gather(self.out_layer(visual, time_embed))
        if grid.fractal:
            out = from_fractal(out, grid.T, grid.H, grid.W)
        else:
            out = out.unflatten(1, (grid.T, grid.H, grid.W))
        return unpatchify(out, cfg.patch_size, cfg.out_visual_dim)
