"""Analytical FLOP count of one Kandinsky 5 DiT forward.

Convention: a multiply-add is 2 FLOPs, and only matrix products are counted (every nn.Linear and the two products
of each attention, q k^T and p v). Norms, RoPE, softmax, modulation arithmetic and residuals are elementwise and
left out, as in the usual MFU accounting: they are a few percent of the work and run far below the matrix peak.

Visual self-attention is counted by the 64x64 tiles it computes: dense counts all of them, NABLA counts the selected
fraction (``density`` = selected tiles / all tiles, averaged over heads, blocks and batch), which the bench measures
from the masks of a real forward. A Lite 5 s 512x768 dense forward counts 0.66 PFLOP, 79% of it attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from k5.engine.model.config import DiTConfig


def latent_grid(height: int, width: int, frames: int, patch=(1, 2, 2)) -> tuple[int, int, int]:
    """Visual token grid (T, H, W) for a video of ``frames`` frames at height x width pixels (VAE: 4x time, 8x space)."""
    if (frames - 1) % 4 or height % (8 * patch[1]) or width % (8 * patch[2]):
        raise ValueError(
            f"{frames} frames at {height}x{width}: frames must be 4k+1 and height, width multiples of "
            f"{8 * patch[1]}x{8 * patch[2]} pixels"
        )
    return ((frames - 1) // 4 + 1) // patch[0], height // 8 // patch[1], width // 8 // patch[2]


@dataclass(frozen=True)
class FlopCount:
    linear: float  # every nn.Linear of the forward
    self_attention: float  # visual self-attention q k^T and p v, scaled by density
    cross_attention: float  # visual queries x text keys
    text_attention: float  # text refiner self-attention

    @property
    def attention(self) -> float:
        return self.self_attention + self.cross_attention + self.text_attention

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def as_dict(self) -> dict:
        return {**asdict(self), "attention": self.attention, "total": self.total}


def _linear(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def forward_flops(cfg: DiTConfig, visual_tokens: int, text_tokens: int, batch: int = 1,
                  density: float = 1.0) -> FlopCount:
    """FLOPs of one DiT forward on ``batch`` samples of ``visual_tokens`` visual and ``text_tokens`` text tokens."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density is the fraction of attention tiles computed, in [0, 1]; got {density}")
    N, L, D, F, Dt = visual_tokens, text_tokens, cfg.model_dim, cfg.ff_dim, cfg.time_dim
    patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    attn_proj = 4 * _linear(1, D, D)  # q, k, v, out for one token
    ffn = _linear(1, D, F) + _linear(1, F, D)

    text_block = L * (attn_proj + ffn) + _linear(1, Dt, 6 * D)
    visual_block = (
        N * (attn_proj + ffn)
        + N * 2 * _linear(1, D, D) + L * 2 * _linear(1, D, D)  # cross-attention: q, out on visual; k, v on text
        + _linear(1, Dt, 9 * D)
    )
    embeddings = (
        _linear(N, cfg.in_channels * patch, D) + _linear(L, cfg.in_text_dim, D) + _linear(1, cfg.in_text_dim2, Dt)
        + _linear(1, D, Dt) + _linear(1, Dt, Dt)  # time embedding MLP
        + _linear(N, D, patch * cfg.out_visual_dim) + _linear(1, Dt, 2 * D)  # output layer and its modulation
    )
    linear = cfg.num_text_blocks * text_block + cfg.num_visual_blocks * visual_block + embeddings
    # q k^T and p v: 2 products of 2*Sq*Sk*D each, over all heads (H * head_dim = D).
    self_attention = cfg.num_visual_blocks * 4.0 * N * N * D * density
    cross_attention = cfg.num_visual_blocks * 4.0 * N * L * D
    text_attention = cfg.num_text_blocks * 4.0 * L * L * D
    return FlopCount(batch * linear, batch * self_attention, batch * cross_attention, batch * text_attention)


def attention_flops(batch: int, heads: int, q_tokens: int, k_tokens: int, head_dim: int,
                    density: float = 1.0) -> float:
    """FLOPs of one attention call (q k^T and p v) computing ``density`` of the tile pairs."""
    return 4.0 * batch * heads * q_tokens * k_tokens * head_dim * density
