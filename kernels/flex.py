"""NABLA's block-sparse attention through FlexAttention: the CUDA kernel, and the CPU route the tests run it on.

Four traps of torch's FlexAttention that this file exists to avoid:
- Tile sizes. A selected 64x64 NABLA tile is one BlockMask block of 64 tokens, and the kernel's own tiles (BLOCK_M
  query rows, BLOCK_N keys) must divide it. Inductor's sm90 defaults are 128x128 (head dim 64) and 128x64 (head dim
  128), which raise "Q and KV block size must be divisible by BLOCK_M and BLOCK_N" at the first forward. Pinning
  only the tiles is not enough either: the warps and stages then still come from the default config, which for
  head dim 128 in bf16 on sm90 and sm100 is (128, 64, 3 stages, 8 warps), tuned for a 128-row tile. So
  ``kernel_options`` gives every knob of the forward kernel (see there for the values).
- Eager fallback. Eager flex_attention evaluates the mask over the whole score matrix and ignores the block
  sparsity of a BlockMask built from kv blocks: it computes dense attention, a wrong result with no error. The
  kernel is compiled once (dynamic=None: the first shape gets a static kernel, a second shape one dynamic-shape
  kernel that every later shape reuses, so a batch job of many sizes never runs out of recompiles), and dynamo's
  recompile limit is made an error for the call, so a fallback to eager raises instead of returning wrong output.
  Compiled code also runs eagerly when dynamo is switched off (TORCHDYNAMO_DISABLE=1, TORCH_COMPILE_DISABLE=1) or a
  compiler stance says so (torch.compiler.set_stance("force_eager") and the like): ``eager_reason`` names that
  state, and NABLA over flex is refused in it (by the CLI before loading, and here at every call).
- Backward-only work. BlockMask.from_kv_blocks by default also builds the transposed (query-block) index lists,
  two dense scatter/argsort passes per layer that only a backward pass reads: compute_q_blocks=False.
- A second sort. The kernel reads, per tile row, the selected key tiles in ascending order. A stable descending
  argsort of the 0/1 mask gives them, but the top-CDF rule has just sorted a tensor of the same size; a running
  count and one scatter give the same indices without sorting again (``kv_tiles``).

On the CPU, compiled flex has no log-sum-exp output and fails to build kernels for BlockMasks holding only *full*
blocks (torch 2.13), so there the selected tiles go in as *partial* blocks with a mask_mod that keeps every
element: the same tiles, the same result, and the same conversion code as the CUDA route.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

BLOCK = 64  # tokens per NABLA tile, one BlockMask block

_compiled = None


# ---- the tile indices the kernel reads ------------------------------------------------------------------------


def kv_tiles(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(selected tiles per row, int32 [...]; tile indices, int32 [..., n]) of a bool tile mask [..., n].

    A row's indices are its selected tiles in ascending order, then its other tiles in ascending order: exactly a
    stable descending argsort of the 0/1 mask, without the sort. A selected tile j goes to position c_j - 1, where
    c_j counts the selected tiles up to and including j; an unselected one to num + (j - c_j). The counts are
    int16 where a row has fewer than 2**15 tiles (every K5 shape: Pro 10 s HD has 3660), which halves the memory
    traffic of the passes before the scatter. Peak 12 bytes per mask element (the int64 positions scatter takes and
    the int32 indices), as the argsort's int64 indices and their int32 copy took.
    """
    n = mask.shape[-1]
    dt = torch.int16 if n < 2**15 else torch.int32
    c = mask.cumsum(-1, dtype=dt)
    num = c[..., -1].to(torch.int32)
    pos = torch.neg(c).add_(torch.arange(n, dtype=dt, device=mask.device)).add_(c[..., -1:])  # unselected
    pos = torch.where(mask, c.sub_(1), pos)
    del c
    pos = pos.long()  # scatter takes int64 positions
    idx = torch.empty(mask.shape, dtype=torch.int32, device=mask.device)
    return num, idx.scatter_(-1, pos, torch.arange(n, dtype=torch.int32, device=mask.device).expand(mask.shape))


def _keep_all(b, h, q_idx, kv_idx):
    """mask_mod of the partial-block route: every element of a selected tile attends (one function object, so
    the compiled kernel's guard on it holds across calls)."""
    return q_idx >= 0


def block_mask_from_tiles(mask: Tensor, q_len: int, kv_len: int, partial: bool = False):
    """BlockMask of a bool tile mask [B, H, nq, nk] (True = compute this 64x64 tile), forward metadata only.

    ``partial=False`` (CUDA): selected tiles are *full* blocks, so the kernel evaluates no mask inside them.
    ``partial=True`` (CPU): they are partial blocks under ``_keep_all``, which computes the same thing.
    """
    from torch.nn.attention.flex_attention import BlockMask

    num, idx = kv_tiles(mask)
    if partial:
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=BLOCK, mask_mod=_keep_all, seq_lengths=(q_len, kv_len),
                                        compute_q_blocks=False)
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=BLOCK, mask_mod=None,
                                    seq_lengths=(q_len, kv_len), compute_q_blocks=False)


# ---- kernel options -----------------------------------------------------------------------------------------------

FLEX_OPTIONS = ("k5", "default", "autotune")
_options = "k5"

# The forward kernel's knobs. BLOCK_M = BLOCK_N = 64: one query tile and one key tile per NABLA block, so every
# selected block is one iteration of the kernel's loop and nothing of an unselected block is loaded. 4 warps, the
# count inductor pairs with 64-row tiles in all its tables; its 8 warps at head dim 128 in half precision on sm90 and
# sm100 (FlexConfig(128, 64, 3, 8) in torch/_inductor/template_heuristics/triton.py, h100_default_flex_config and
# sm_100_default_flex_config) belong to 128-row tiles, and the old 64x64 pins kept them. 3 stages (K/V tiles in
# flight), inductor's count for these sizes, fewer where the device's shared memory cannot hold them. Once the tiles
# must divide 64, inductor's own autotuning list keeps only (64, 64, 3 stages, 4 warps) of its candidates
# (flex_attn_fwd_autotune_configs). None of this is measured on a GPU yet: bench/run.py --flex-options compares.
TILE, NUM_WARPS, NUM_STAGES = 64, 4, 3
# What the "autotune" choice lets inductor time on the device: (BLOCK_M, BLOCK_N, num_stages, num_warps), every
# tile dividing the 64-token blocks.
AUTOTUNE_CONFIGS = tuple((m, n, s, w) for m, n in ((64, 64), (32, 64), (64, 32)) for s in (2, 3, 4) for w in (4, 8)
                         if (m, n) == (64, 64) or w == 4)


def shared_memory_bytes(capability: tuple[int, int]) -> int:
    """Shared memory one block may use (the opt-in maximum) on a device of this compute capability (CUDA C++
    Programming Guide, technical specifications per compute capability)."""
    major, minor = capability
    if major in (9, 10):  # H100 / H200, B200 / GB200
        return 227 * 1024
    if (major, minor) in ((8, 0), (8, 7)):  # A100, Orin
        return 163 * 1024
    return 99 * 1024  # sm86 / sm89 / sm120 (workstation Ampere, Ada, Blackwell) and anything unknown


def tiles_fit(capability, head_dim: int, dtype: torch.dtype, block_m: int, block_n: int, stages: int) -> bool:
    """Whether the query tile and ``stages`` K/V tile pairs fit the shared memory (with 16 KiB for the rest)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    need = (block_m + 2 * stages * block_n) * head_dim * elem
    return need + 16 * 1024 <= shared_memory_bytes(capability)


def kernel_options(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None,
                   choice: str | None = None) -> dict:
    """FlexAttention kernel_options of NABLA's forward for q/k/v of ``head_dim`` and ``dtype``, on a CUDA device of
    compute ``capability`` (None: the CPU). ``choice`` (default: the process's, ``set_flex_options``):
    "k5" every knob of the forward kernel (see TILE, NUM_WARPS, NUM_STAGES); "default" only the 64x64 tiles, warps
    and stages from inductor's default config (what k5 did before); "autotune" nothing, inductor times
    AUTOTUNE_CONFIGS on the device at compile time."""
    choice = choice or _options
    if choice not in FLEX_OPTIONS:
        raise ValueError(f"flex kernel options {choice!r} are not one of {', '.join(FLEX_OPTIONS)}")
    if capability is None:  # the CPU template reads only the tiles
        return {"BLOCK_M": TILE, "BLOCK_N": TILE}
    if choice == "autotune":
        return {}
    if choice == "default":
        return {"BLOCK_M": TILE, "BLOCK_N": TILE}
    stages = next((s for s in (NUM_STAGES, 2, 1) if tiles_fit(capability, head_dim, dtype, TILE, TILE, s)), 1)
    return {"BLOCK_M": TILE, "BLOCK_N": TILE, "num_warps": NUM_WARPS, "num_stages": stages}


def set_flex_options(name: str) -> None:
    """Choose the flex kernel options of this process (kernel_options). "autotune" also makes inductor time
    AUTOTUNE_CONFIGS for every flex forward it compiles from now on (its other kernels keep their defaults)."""
    global _options
    if name not in FLEX_OPTIONS:
        raise ValueError(f"flex kernel options {name!r} are not one of {', '.join(FLEX_OPTIONS)}")
    if name == "autotune" or _choices_class is not None:
        import torch._inductor.config as inductor_config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V

        ours = _tile_dividing_choices()
        if name == "autotune":
            inductor_config.inductor_choices_class = ours
            V.set_choices_handler(ours())  # inductor keeps the choices of its first compile per thread
        elif inductor_config.inductor_choices_class is ours:
            inductor_config.inductor_choices_class = None
            V.set_choices_handler(InductorChoices())
    _options = name


def flex_options() -> str:
    return _options


_choices_class = None


def _tile_dividing_choices():
    """The InductorChoices of the "autotune" choice (made on first use: importing inductor takes a while)."""
    global _choices_class
    if _choices_class is not None:
        return _choices_class
    from torch._inductor.choices import InductorChoices

    class TileDividingChoices(InductorChoices):
        """Inductor's choices, except that a CUDA flex forward is autotuned over AUTOTUNE_CONFIGS (those that fit
        the device's shared memory), not over inductor's list, whose tiles mostly do not divide 64."""

        def get_flex_attention_fwd_configs(self, head_dim, dtype, device_type="cuda"):
            if device_type != "cuda":
                return super().get_flex_attention_fwd_configs(head_dim, dtype, device_type)
            from torch._inductor.template_heuristics.triton import FlexConfig

            cap = torch.cuda.get_device_capability()
            return [FlexConfig(m, n, s, w) for m, n, s, w in AUTOTUNE_CONFIGS
                    if tiles_fit(cap, head_dim, dtype, m, n, s)]

        def uuid(self) -> str:  # part of inductor's cache key
            return "k5.kernels.flex.TileDividingChoices/1"

    _choices_class = TileDividingChoices
    return _choices_class


def _capability(device: torch.device) -> tuple[int, int]:
    # get_device_capability reads get_device_properties, which dynamo constant-folds: no graph break inside a
    # compiled block
    return tuple(torch.cuda.get_device_capability(device))


# ---- compiled, or refused ----------------------------------------------------------------------------------------


def eager_reason() -> str | None:
    """Why torch.compile'd code would run eagerly in this process right now (a setting or stance that switches
    dynamo off), or None. Eager FlexAttention ignores the block sparsity of NABLA's BlockMask."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo import eval_frame

    if os.environ.get("TORCHDYNAMO_DISABLE", "") == "1":
        return "TORCHDYNAMO_DISABLE=1 is set (torch.compile then returns the function uncompiled)"
    if dynamo_config.disable:
        return "TORCH_COMPILE_DISABLE=1 is set (torch._dynamo.config.disable)"
    stance = getattr(eval_frame, "_stance", None)
    if stance is not None and stance.stance not in ("default", "fail_on_recompile"):
        return f'the compiler stance is "{stance.stance}" (torch.compiler.set_stance), which runs compiled code eagerly'
    if stance is not None and stance.backend not in (None, "inductor"):
        return f"torch.compiler.set_stance forces the backend {stance.backend!r}, which runs flex attention eagerly"
    return None


def refusal(reason: str) -> str:
    return (f"NABLA attention over FlexAttention needs torch.compile, but {reason}: eager FlexAttention ignores the "
            f"block mask and computes dense attention (a wrong video, or out of memory at video lengths). Unset "
            f"TORCHDYNAMO_DISABLE / TORCH_COMPILE_DISABLE and keep the default compiler stance, or run NABLA with the "
            f"block-sparse gather kernel (the CPU's: --device cpu, or nabla_backend('gather')), or use --attention "
            f"dense")


def check_compiled_flex() -> None:
    """Raise ValueError (the CLI: exit 2) when NABLA over flex would run eagerly in this process (eager_reason)."""
    reason = eager_reason()
    if reason is not None:
        raise ValueError(refusal(reason))


def compiled_flex():
    """The one compiled flex_attention of this process (see the module docstring for dynamic=None)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=None)
    return _compiled


@contextlib.contextmanager
def recompile_limit_is_an_error():
    """Within this block, a frame that hits dynamo's recompile limit raises instead of running eagerly."""
    import torch._dynamo.config as dynamo_config

    if not hasattr(dynamo_config, "fail_on_recompile_limit_hit"):  # every torch this package accepts has it
        raise RuntimeError(f"torch {torch.__version__} lacks torch._dynamo.config.fail_on_recompile_limit_hit")
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        yield


def flex_block_sparse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, return_lse: bool = True):
    """Attention of q [B, H, nq*64, D] over k, v [B, H, nk*64, D] restricted to the tiles of ``mask`` (BHSD).

    Returns (out [B, H, Sq, D] in q.dtype, lse fp32 [B, H, Sq] or None). Rows whose tile row is empty hold
    unspecified values: the caller pins them (block_sparse_attention does). ``return_lse`` is refused on the CPU,
    whose compiled flex cannot produce it.
    """
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    on_cpu = q.device.type == "cpu"
    if return_lse and on_cpu:
        raise ValueError("compiled FlexAttention on the CPU returns no log-sum-exp; use the CPU gather kernel "
                         "(k5.kernels.nabla, backend 'gather') where the lse is needed")
    compiling = torch.compiler.is_compiling()
    if not compiling and (reason := eager_reason()) is not None:
        raise RuntimeError(refusal(reason))
    if on_cpu:
        # Inductor's CPU flex template reads its inputs as plain buffers: a transposed view inside a compiled block
        # fails its lowering. (The CUDA kernel takes strided inputs.)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bm = block_mask_from_tiles(mask, q.shape[2], k.shape[2], partial=on_cpu)
    options = kernel_options(q.shape[-1], q.dtype, None if on_cpu else _capability(q.device))
    kwargs = {"block_mask": bm, "kernel_options": options}
    if return_lse:
        kwargs["return_aux"] = AuxRequest(lse=True)
    if compiling:
        # Traced into the caller's compiled graph (a regionally compiled DiT block): inductor lowers it there.
        res = flex_attention(q, k, v, **kwargs)
    else:
        with recompile_limit_is_an_error():
            res = compiled_flex()(q, k, v, **kwargs)
    if return_lse:
        out, aux = res
        return out, aux.lse
    return res, None
