"""The Kandinsky 6 video/audio DiT, single device, plain PyTorch.

One transformer denoises a video latent and an audio latent together. Each stream has its own text branch (the same
Qwen2.5-VL tokens through the stream's own embedding and text blocks, the same CLIP vector added to the stream's own
time embedding). Every fused block then runs, per stream, a Kandinsky 5 visual block's three sub-layers
(self-attention, cross-attention to the stream's text, FFN), and between the cross-attention and the FFN two
cross-modal attentions: video queries over the audio tokens (``va``) and audio queries over the video tokens
(``av``). Their keys are the *other* stream's tokens as they entered its text cross-attention.

Module names are the original checkpoint's (engine/checkpoints/state_dict.py maps the diffusers names onto them), so the
per-stream blocks are engine.model.dit's own TextBlock and VisualBlock (the latter as a container of sub-layers: the fused
block orchestrates them). Numerics as the Kandinsky 5 DiT and diffusers' Kandinsky 6: time embedding, modulation,
norm-scale-shift and gated residuals in fp32; RoPE in fp32 (unlike Kandinsky 5's diffusers port, diffusers' K6
keeps the rotated q/k in the compute dtype: no bf16 rounding in fp32).

Parallelism is applied from outside through the model's attributes, as for Kandinsky 5:
- ``model.tokens``: how the video tokens are scattered before the fused blocks and gathered after the output
  projection (identity here); the audio tokens are never split (parallel/k6.py says why);
- ``model.visual_attention``: the video self-attention (dense or NABLA);
- ``model.audio_from_video``: the ``av`` attention, audio queries over all video tokens, the only attention whose
  keys are the video tokens besides the self-attention.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k5.kernels.attention import attention
from k5.kernels.nabla import from_fractal, to_fractal

from k5.engine.model.dit import (Attention, LocalAttention, LocalTokens, Modulation, OutLayer, TextBlock,
                                 TextEmbeddings, TimeEmbeddings, TokenGrid, VisualBlock, VisualEmbeddings, apply_rope,
                                 gated_add, get_freqs, modulate, unpatchify, VisualAttentionChoice)
from k5.engine.model.k6_config import K6Config, StreamDims

Rope = tuple[Tensor, Tensor]  # cos, sin [S, head_dim/2] fp32


def rope_1d(n: int, head_dim: int, device, scaling: float = 1.0) -> Rope:
    """Angles of positions 0..n-1; the audio stream scales the frequencies (before the product, as diffusers)."""
    freqs = get_freqs(head_dim // 2).to(device) * scaling
    angles = torch.arange(n, dtype=torch.float32, device=device)[:, None] * freqs[None]
    return angles.cos(), angles.sin()


def rope_angles_3d_at(pos: tuple[Tensor, Tensor, Tensor], axes_dims, scale_factor) -> Tensor:
    """Angles [T, H, W, head_dim/2] of the token grid with explicit per-axis positions (I2AV gives its tail frame
    position 0), each axis's positions divided by its scale factor."""
    T, H, W = (len(p) for p in pos)
    parts = []
    for axis, (p, d, sf) in enumerate(zip(pos, axes_dims, scale_factor)):
        a = p.to(torch.float32)[:, None] * get_freqs(d // 2).to(p.device)[None] / sf
        shape = [1, 1, 1, d // 2]
        shape[axis] = len(p)
        parts.append(a.view(shape).expand(T, H, W, d // 2))
    return torch.cat(parts, -1)


class CrossModalAttention(Attention):
    """Attention whose keys come from the other stream, of another width."""

    def __init__(self, dim: int, head_dim: int, kv_dim: int):
        super().__init__(dim, head_dim)
        self.to_key = nn.Linear(kv_dim, dim)
        self.to_value = nn.Linear(kv_dim, dim)


class AudioOutLayer(nn.Module):
    def __init__(self, dims: StreamDims, out_dim: int):
        super().__init__()
        self.modulation = Modulation(dims.time_dim, dims.model_dim, 2)
        self.out_layer = nn.Linear(dims.model_dim, out_dim)

    def forward(self, x: Tensor, time_embed: Tensor) -> Tensor:
        shift, scale = self.modulation(time_embed)
        x = modulate(x, shift, scale)
        # The released weights were trained with a second norm after the adaLN affine (the video head has none).
        return self.out_layer(F.layer_norm(x.float(), x.shape[-1:]).type_as(x))


class FusedBlock(nn.Module):
    """Video and audio sub-layers of one depth, with the two cross-modal attentions between them."""

    def __init__(self, cfg: K6Config):
        super().__init__()
        video, audio = cfg.video, cfg.audio
        self.videoT = VisualBlock(video)
        self.audioT = VisualBlock(audio)
        self.va_cross_attention = CrossModalAttention(video.model_dim, video.head_dim, audio.model_dim)
        self.av_cross_attention = CrossModalAttention(audio.model_dim, audio.head_dim, video.model_dim)
        # cross_gates: one Linear gives this stream's shift and scale and the OTHER stream's gate
        gated = cfg.cross_gates
        self.va_modulation = Modulation(video.time_dim, 2 * video.model_dim + audio.model_dim if gated
                                        else video.model_dim, 1 if gated else 3)
        self.av_modulation = Modulation(audio.time_dim, 2 * audio.model_dim + video.model_dim if gated
                                        else audio.model_dim, 1 if gated else 3)
        self.cross_gates, self.ca_rope, self.fix_modulation = cfg.cross_gates, cfg.ca_rope, cfg.fix_modulation
        self.dims = (video.model_dim, audio.model_dim)

    def forward(self, vis: Tensor, aud: Tensor | None, text_v: Tensor, text_a: Tensor, t_v: Tensor, t_a: Tensor,
                rope_v: Rope, rope_a: Rope | None, text_mask: Tensor | None, self_attn, audio_from_video,
                grid: TokenGrid) -> tuple[Tensor, Tensor | None]:
        V = self.videoT
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
         ff_shift, ff_scale, ff_gate) = V.visual_modulation(t_v)
        q, k, v = V.self_attention.qkv(modulate(vis, sa_shift, sa_scale))
        vis = gated_add(vis, sa_gate, V.self_attention.out(self_attn(apply_rope(q, *rope_v), apply_rope(k, *rope_v),
                                                                     v, grid)))
        vis_pre_ca = modulate(vis, ca_shift, ca_scale)
        q, k, v = V.cross_attention.qkv(vis_pre_ca, text_v)
        vis = gated_add(vis, ca_gate, V.cross_attention.out(attention(q, k, v, key_mask=text_mask)))
        if aud is not None:
            A = self.audioT
            (a_sa_shift, a_sa_scale, a_sa_gate, a_ca_shift, a_ca_scale, a_ca_gate,
             a_ff_shift, a_ff_scale, a_ff_gate) = A.visual_modulation(t_a)
            q, k, v = A.self_attention.qkv(modulate(aud, a_sa_shift, a_sa_scale))
            aud = gated_add(aud, a_sa_gate, A.self_attention.out(attention(apply_rope(q, *rope_a),
                                                                           apply_rope(k, *rope_a), v)))
            aud_pre_ca = modulate(aud, a_ca_shift, a_ca_scale)
            q, k, v = A.cross_attention.qkv(aud_pre_ca, text_a)
            aud = gated_add(aud, a_ca_gate, A.cross_attention.out(attention(q, k, v, key_mask=text_mask)))
            vis, aud = self._cross_modal(vis, aud, vis_pre_ca, aud_pre_ca, t_v, t_a, rope_v, rope_a,
                                         audio_from_video)
            aud = gated_add(aud, a_ff_gate, A.feed_forward(modulate(aud, a_ff_shift, a_ff_scale)))
        return gated_add(vis, ff_gate, V.feed_forward(modulate(vis, ff_shift, ff_scale))), aud

    def _cross_modal(self, vis, aud, vis_keys, aud_keys, t_v, t_a, rope_v, rope_a, audio_from_video):
        md, md_a = self.dims
        # Without fix_modulation each stream's cross-modal modulation reads the other stream's time embedding.
        t_va, t_av = (t_v, t_a) if self.fix_modulation else (t_a, t_v)
        if self.cross_gates:
            (va,) = self.va_modulation(t_va)
            (av,) = self.av_modulation(t_av)
            va_shift, va_scale, aud_gate = va.split([md, md, md_a], -1)
            av_shift, av_scale, vis_gate = av.split([md_a, md_a, md], -1)
        else:
            va_shift, va_scale, vis_gate = self.va_modulation(t_va)
            av_shift, av_scale, aud_gate = self.av_modulation(t_av)

        q, k, v = self.va_cross_attention.qkv(modulate(vis, va_shift, va_scale), aud_keys)
        if self.ca_rope:
            q, k = apply_rope(q, *rope_v), apply_rope(k, *rope_a)
        vis_from_aud = self.va_cross_attention.out(attention(q, k, v))
        q, k, v = self.av_cross_attention.qkv(modulate(aud, av_shift, av_scale), vis_keys)
        if self.ca_rope:
            q, k = apply_rope(q, *rope_a), apply_rope(k, *rope_v)
        aud_from_vis = self.av_cross_attention.out(audio_from_video(q, k, v))
        return gated_add(vis, vis_gate, vis_from_aud), gated_add(aud, aud_gate, aud_from_vis)


def _dense(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attention(q, k, v)


class Kandinsky6DiT(VisualAttentionChoice, nn.Module):
    def __init__(self, cfg: K6Config):
        super().__init__()
        self.config = cfg
        video, audio = cfg.video, cfg.audio
        self.visual_embeddings = VisualEmbeddings(cfg.in_channels, cfg.model_dim, cfg.patch_size)
        if cfg.visual_token_type_num_embeddings:
            self.visual_token_type_embeddings = nn.Embedding(cfg.visual_token_type_num_embeddings, cfg.model_dim)
        self.audio_embeddings = TextEmbeddings(cfg.in_audio_dim, audio.model_dim)
        for stream, dims in (("video", video), ("audio", audio)):
            setattr(self, f"{stream}_time_embeddings", TimeEmbeddings(dims.model_dim, dims.time_dim))
            setattr(self, f"{stream}_text_embeddings", TextEmbeddings(cfg.in_text_dim, dims.model_dim))
            setattr(self, f"{stream}_pooled_text_embeddings", TextEmbeddings(cfg.in_text_dim2, dims.time_dim))
            setattr(self, f"{stream}_text_transformer_blocks",
                    nn.ModuleList(TextBlock(dims) for _ in range(cfg.num_text_blocks)))
        self.visual_blocks = nn.ModuleList(FusedBlock(cfg) for _ in range(cfg.num_visual_blocks))
        self.out_layer = OutLayer(cfg)
        self.audio_outLayer = AudioOutLayer(audio, cfg.out_audio_dim)
        self.tokens = LocalTokens()
        self.visual_attention = LocalAttention(self.default_nabla())
        self.audio_from_video: Callable[[Tensor, Tensor, Tensor], Tensor] = _dense

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_embeddings.in_layer.weight.dtype

    def _text_branch(self, stream: str, text: Tensor, pooled: Tensor, timestep: Tensor, mask: Tensor | None):
        dims = getattr(self.config, stream)
        embed = getattr(self, f"{stream}_text_embeddings")(text)
        # The sum with the fp32 time embedding is fp32, as under the original's autocast.
        time_embed = getattr(self, f"{stream}_time_embeddings")(timestep) + \
            getattr(self, f"{stream}_pooled_text_embeddings")(pooled).float()
        cos, sin = rope_1d(text.shape[1], dims.head_dim, text.device)
        for block in getattr(self, f"{stream}_text_transformer_blocks"):
            embed = block(embed, time_embed, cos, sin, mask)
        return embed, time_embed

    def forward(self, x: Tensor, audio: Tensor | None, text_embeds: Tensor, pooled_embeds: Tensor, timestep: Tensor,
                text_mask: Tensor | None = None, visual_rope_pos: tuple[Tensor, Tensor, Tensor] | None = None,
                visual_token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Predictions for video latents x [B,T,H,W,C_in] and audio latents [B,La,C_a] (or None: video alone) at
        timesteps (sigma*1000, fp32) [B]: video [B,T,H,W,out_visual_dim] and audio [B,La,out_audio_dim] or None.

        ``visual_rope_pos``: per-axis positions of the patch grid (default arange); ``visual_token_type_ids``
        [B, T']: per latent frame, added through the token-type embedding (I2AV's tail frame is type 1).
        """
        cfg = self.config
        B, T, H, W, C = x.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_channels:
            raise ValueError(f"latent has {C} channels, the DiT expects {cfg.in_channels}")
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent grid {(T, H, W)} is not divisible by the patch size {cfg.patch_size}")
        if audio is not None and (audio.shape[0] != B or audio.shape[-1] != cfg.in_audio_dim):
            raise ValueError(f"audio latent [B, La, {cfg.in_audio_dim}] with B = {B} expected, got "
                             f"{tuple(audio.shape)}")
        if visual_token_type_ids is not None and not cfg.visual_token_type_num_embeddings:
            raise ValueError("visual_token_type_ids need a checkpoint with visual_token_type_num_embeddings > 0")
        dtype = self.dtype
        timestep = torch.as_tensor(timestep, device=x.device).float().reshape(-1).expand(B)
        text, pooled = text_embeds.to(dtype), pooled_embeds.to(dtype)
        text_v, t_v = self._text_branch("video", text, pooled, timestep, text_mask)
        # The audio text branch feeds the audio sub-layers only (the reference runs it without audio too).
        text_a, t_a = (self._text_branch("audio", text, pooled, timestep, text_mask) if audio is not None
                       else (None, None))

        grid = TokenGrid(T // pt, H // ph, W // pw, fractal=self.nabla is not None)
        if grid.fractal and (grid.H % 8 or grid.W % 8):
            raise ValueError(f"NABLA needs latent height and width divisible by 16 (pixel sizes by 128); got a "
                             f"latent of {H}x{W}: use another size or --attention dense")
        visual = self.visual_embeddings(x.to(dtype))
        if visual_token_type_ids is not None:
            visual = visual + self.visual_token_type_embeddings(visual_token_type_ids)[:, :, None, None, :]
        if visual_rope_pos is None:
            visual_rope_pos = tuple(torch.arange(n, device=x.device) for n in (grid.T, grid.H, grid.W))
        angles = rope_angles_3d_at(visual_rope_pos, cfg.axes_dims, cfg.scale_factor)
        if grid.fractal:
            visual, angles = to_fractal(visual), to_fractal(angles[None])[0]
        else:
            visual, angles = visual.flatten(1, 3), angles.flatten(0, 2)
        visual = self.tokens.scatter(visual)
        angles = self.tokens.scatter(angles, dim=0)
        rope_v = (angles.cos(), angles.sin())

        aud = rope_a = None
        if audio is not None:
            aud = self.audio_embeddings(audio.to(dtype))
            rope_a = rope_1d(audio.shape[1], cfg.audio.head_dim, x.device, cfg.audio_freqs_scaling)

        for block in self.visual_blocks:
            visual, aud = block(visual, aud, text_v, text_a, t_v, t_a, rope_v, rope_a, text_mask,
                                self.visual_attention, self.audio_from_video, grid)

        out = self.tokens.gather(self.out_layer(visual, t_v))
        if grid.fractal:
            out = from_fractal(out, grid.T, grid.H, grid.W)
        else:
            out = out.unflatten(1, (grid.T, grid.H, grid.W))
        video_out = unpatchify(out, cfg.patch_size, cfg.out_visual_dim)
        return video_out, (self.audio_outLayer(aud, t_a) if aud is not None else None)


def param_count(cfg: K6Config) -> int:
    """Parameters of the DiT of ``cfg`` (built on the meta device)."""
    with torch.device("meta"):
        model = Kandinsky6DiT(cfg)
    return sum(math.prod(p.shape) for p in model.parameters())
