"""The reference implementations the bench runs beside ours, on the same weights and inputs.

- diffusers' ``Kandinsky5Transformer3DModel``: random weights are saved once with diffusers' own ``save_pretrained``
  and both models load that folder, so they hold bitwise the same parameters; it runs with its best attention
  backend for the device.
- xfuser's USP attention (``xFuserLongContextAttention``): only on a GPU where xfuser imports; it is imported inside
  that code path, never at module level (it raises at import time without an accelerator).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from k5.engine.model.config import DiTConfig
from k5.kernels.nabla import NABLA_WINDOW, sta_block_mask


def _init_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random values everywhere, with unit-variance activations: the libraries zero-init the modulation,
    which would make the blocks identities and the attention masks meaningless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.empty(p.shape, dtype=torch.float32).normal_(generator=g)
            if "norm" in name:
                noise = (1.0 if name.endswith("weight") else 0.0) + 0.1 * noise
            elif p.ndim >= 2:
                noise = noise / math.sqrt(p.shape[-1])
            else:
                noise = 0.1 * noise
            p.copy_(noise)
    return model


def diffusers_kwargs(cfg: DiTConfig) -> dict:
    kwargs = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and not k.startswith("attention")}
    if cfg.uses_nabla:
        kwargs.update(
            attention_type="nabla", attention_causal=False, attention_local=False, attention_glob=False,
            attention_window=3, attention_method="topcdf", attention_P=cfg.attention_P, attention_add_sta=True,
            attention_wT=cfg.attention_wT or NABLA_WINDOW[0], attention_wH=cfg.attention_wH or NABLA_WINDOW[1],
            attention_wW=cfg.attention_wW or NABLA_WINDOW[2],
        )  # fmt: skip
    return kwargs


def save_random_checkpoint(cfg: DiTConfig, folder: Path, seed: int = 0) -> Path:
    """Random weights in the diffusers layout (``folder/transformer``), written by diffusers' save_pretrained."""
    from diffusers import Kandinsky5Transformer3DModel

    model = _init_(Kandinsky5Transformer3DModel(**diffusers_kwargs(cfg)), seed)
    # Written in bf16 (half the bytes); fp32 runs load exactly these bf16 values into fp32 in both models.
    model.to(torch.bfloat16).save_pretrained(folder / "transformer")
    return folder


def temp_checkpoint_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="k5-bench-"))


class DiffusersPeer:
    """diffusers' Kandinsky 5 transformer on the bench's inputs (channels-last latents, like ours)."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device, nabla_P: float | None):
        from diffusers import Kandinsky5Transformer3DModel

        self.model = Kandinsky5Transformer3DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.dtype, self.device, self.nabla_P = dtype, device, nabla_P
        self.backend = self._pick_backend()

    def _pick_backend(self) -> str:
        if self.nabla_P is not None:
            # diffusers' NABLA hands a BlockMask to attention: only its flex backend accepts one.
            backend = "flex"
        elif self.device.type == "cuda":
            # Hopper: cuDNN attention is torch's fastest dense kernel for bf16 (flash-attn packages are not assumed).
            backend = "_native_cudnn" if self.dtype in (torch.bfloat16, torch.float16) else "native"
        else:
            backend = "native"  # SDPA: on CPU the fused flash kernel
        self.model.set_attention_backend(backend)
        return backend

    def compile(self) -> None:
        self.model.compile_repeated_blocks(fullgraph=False, dynamic=False)

    def sparse_params(self, grid: tuple[int, int, int]) -> dict | None:
        if self.nabla_P is None:
            return None
        cfg = self.model.config
        T, H, W = grid
        sta = sta_block_mask(T, H // 8, W // 8, cfg.attention_wT, cfg.attention_wH, cfg.attention_wW, self.device)
        return {"sta_mask": sta[None, None], "attention_type": "nabla", "to_fractal": True, "P": self.nabla_P,
                "wT": cfg.attention_wT, "wH": cfg.attention_wH, "wW": cfg.attention_wW, "add_sta": True}

    @torch.no_grad()
    def forward(self, x, text, pooled, t, scale_factor=(1.0, 2.0, 2.0)):
        T, H, W = x.shape[1], x.shape[2] // 2, x.shape[3] // 2
        d = self.device
        return self.model(
            hidden_states=x.to(self.dtype), encoder_hidden_states=text.to(self.dtype), timestep=t,
            pooled_projections=pooled.to(self.dtype),
            visual_rope_pos=[torch.arange(T, device=d), torch.arange(H, device=d), torch.arange(W, device=d)],
            text_rope_pos=torch.arange(text.shape[1], device=d), scale_factor=scale_factor,
            sparse_params=self.sparse_params((T, H, W)), return_dict=False,
        )


def xfuser_usp_attention(ulysses: int, ring: int):
    """xfuser's USP attention callable (q, k, v [B, S/P, H, D] -> out), or raise ImportError/RuntimeError.

    Uses the bench's process group, or starts one of one process.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("xfuser runs on GPUs only")
    import torch.distributed as dist

    if not dist.is_initialized():  # one process: xfuser still wants a process group (of one)
        # An in-process store: no port to find free and hand out later, where another process could take it.
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel
    from xfuser.core.long_ctx_attention import xFuserLongContextAttention

    init_distributed_environment(rank=dist.get_rank(), world_size=dist.get_world_size())
    initialize_model_parallel(sequence_parallel_degree=ulysses * ring, ring_degree=ring, ulysses_degree=ulysses)
    attn = xFuserLongContextAttention()
    return lambda q, k, v: attn(None, q, k, v)
