"""Memory: what a rank of a parallel layout will need, estimated before any weight loads.

Estimate. Per rank and per phase of an item (text encoding, denoising, VAE decode): the weights resident on the
device in that phase (which depends on ``--offload``) plus the phase's activations, from the checkpoint's
safetensors headers and config (no tensor is read) and the item's shape. A run whose largest phase exceeds the
device's free memory is refused before loading, with the estimate and the settings that would fit. The activation
model counts the tensors alive at the peak of a DiT block (full width on every rank whatever --tp-degree: the
residual, the modulated input and the fp32 temporaries of modulate / gated_add; split by --tp-degree: q/k/v and the
attention output, the FFN's hidden pair), the sequence-parallel buffers, the NABLA mask temporaries, and for the
decode the decoded video, its uint8 conversion and one tile's decoder activations, and on the rank that collects the
tiles of a parallel decode its send and receive buffers. On a GPU every phase also holds cuBLAS's workspace and, with
more than one process, NCCL's buffers (``Parallel``). With more than one process the text encoders live on the text
source rank only (parallel/text_share.py): freed after the encode of a single video, kept on the device for the
whole job when it has several items (whatever --offload says: the offload modes move a single process's encoders).

What a run used (measured, per phase) is engine/memory.py's.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from k5.engine.memory import GiB, OFFLOAD_MODES
from k5.engine.vae.video import vae_dtype

_FRAGMENTATION = 1.15  # the caching allocator's blocks round up and fragment: activations need some headroom
MiB = 2**20
_RUNTIME = GiB // 2  # torch's own share: kernels and libraries in host memory, cuDNN workspaces on a GPU
# cuBLAS's workspace per (handle, stream) pair, taken from torch's caching allocator at the first matmul: 32 MiB on
# sm90 and newer (4096 KiB x 8), 8 MiB + 128 KiB before (":4096:2:16:8"), and the cuBLASLt workspace, 1 MiB
# (aten/src/ATen/cuda/CublasHandlePool.cpp: parseChosenWorkspaceSize, parseCUDABlasLtWorkspaceSize; overridden by
# CUBLAS_WORKSPACE_CONFIG and CUBLASLT_WORKSPACE_SIZE). k5's matmuls run on one stream.
CUBLAS_WORKSPACE = 32 * MiB + 1 * MiB
# NCCL's own buffers, allocated by NCCL outside torch's allocator when a communicator runs its first collective,
# i.e. after the free memory was read. They grow with the channels NCCL opens, which it chooses from the topology,
# so these are measured figures, not a formula: about 0.5-0.7 GB per communicator on 4 x A100 NVLink
# (NVIDIA/nccl#964: 544 MB for 2 ranks, 688 MB for more), 1.06 GB on 8 x H100 (NVIDIA/nccl#1685), 1.6 GB in
# NVIDIA/nccl#864; and an all-to-all or point-to-point exchange adds buffers per peer (#1685: an 8-rank all_to_all
# added 3.3 GB, 32 channels per pair of 10 MiB + 2 MiB buffers: 0.47 GB per peer). NCCL_BUFFSIZE (default 4 MiB)
# and NCCL_MAX_NCHANNELS scale them.
NCCL_COMMUNICATOR = GiB
NCCL_PEER = GiB // 2


# ---- estimated -------------------------------------------------------------------------------------------------


def dit_rank_bytes(dit, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes of one tensor-parallel rank's DiT parameters: the fp32 ones (time embedding, modulation, q/k norms) at
    4 bytes, the rest at ``dtype_bytes``; a tensor the tp plan cuts (parallel/tensor.py) at 1/tp, the replicated
    ones (embeddings, norms, the row-wise layers' biases, the final projection) whole."""
    from k5.parallel.tensor import shard_dim

    from k5.engine.checkpoints.dit import keeps_fp32

    total = 0
    for name, p in dit.named_parameters():
        n = p.numel() // tp if tp > 1 and shard_dim(name) is not None else p.numel()
        total += n * (4 if keeps_fp32(name) else dtype_bytes)
    return total


@dataclass(frozen=True)
class Weights:
    """Bytes of each component as it sits on the device."""

    dit: int
    text: int
    vae: int

    @classmethod
    def of_checkpoint(cls, checkpoint, cfg, dtype: torch.dtype, device_type: str, tp: int = 1, lm_head: bool = False,
                      vision: bool = False) -> "Weights":
        """From a checked engine.checkpoints.files.Checkpoint (the headers it read; no file is opened again) or a
        folder (opened here). ``lm_head``: prompt expansion loads Qwen's language-model head (nothing more when the
        checkpoint ties it to the embedding); ``vision``: an image prompt (an edit, or the expansion of an I2V/I2I
        item) loads its vision tower."""
        from k5.engine.checkpoints.dit import open_checkpoint
        from k5.engine.model.dit import meta_dit

        from k5.engine.model.k6_config import K6Config

        checkpoint = open_checkpoint(checkpoint)
        b = dtype.itemsize
        if isinstance(cfg, K6Config):  # Kandinsky 6: both streams' blocks (its audio decoder runs after the DiT)
            from k5.engine.model.k6_dit import Kandinsky6DiT

            with torch.device("meta"):
                dit_bytes = dit_rank_bytes(Kandinsky6DiT(cfg), b, tp)
        else:
            dit_bytes = dit_rank_bytes(meta_dit(cfg), b, tp)
        # Qwen2.5-VL's text decoder always (engine/encoders/text.py); its lm_head and vision tower only where used.
        text = checkpoint.bytes("text_encoder",
                                lambda k: ("visual" not in k or vision) and ("lm_head" not in k or lm_head), b)
        # CLIP counted in fp32, as the reference runs it whatever the compute dtype.
        text += checkpoint.bytes("text_encoder_2", dtype_bytes=4)
        vae_b = vae_dtype(device_type).itemsize
        vae = checkpoint.bytes("vae", dtype_bytes=vae_b)
        return cls(dit_bytes, text, vae)


@dataclass(frozen=True)
class Shape:
    frames: int
    height: int
    width: int


def block_bytes_per_token(cfg, dtype: torch.dtype, ulysses: int = 1, ring: int = 1, tp: int = 1) -> int:
    """Activation bytes per local token alive at the peak of a DiT block on one rank.

    Full width on every rank, whatever ``tp``: the residual stream, the modulated input or the sublayer's output
    (a row-wise layer all-reduces back to the full model_dim, parallel/tensor.py), and the fp32 temporaries of
    modulate / gated_add (budget: four full-width fp32 vectors). Split over ``tp`` (this rank's heads and FFN
    columns): q, k, v and the attention output, the FFN hidden pair, and the sequence-parallel buffers, which carry
    q/k/v or K/V and the attention output.
    """
    b = dtype.itemsize
    D, Dt, Ft = cfg.model_dim, cfg.model_dim // tp, cfg.ff_dim // tp
    full = 2 * D * b + 4 * D * 4
    split = 4 * Dt * b + 2 * Ft * b
    if ulysses > 1:
        split += 2 * 3 * Dt * b  # packed q/k/v all-to-all: send and receive buffers
    if ring > 1:
        split += 2 * 2 * Dt * b + Dt * 4  # two K/V buffers in flight, the fp32 merge accumulator
    return full + split


_TOP_CDF_BYTES = 4 + 4 + 8 + 4 + 1  # per score element, see nabla_mask_bytes
_TILE_INDEX_BYTES = 8 + 4  # per mask element of a ring step: int64 positions and int32 indices, see nabla_mask_bytes


def nabla_mask_bytes(heads: int, q_blocks: int, k_blocks: int, k_valid: int | None = None, ring: int = 1) -> int:
    """Peak bytes of one layer's NABLA mask on one rank (batch 1): rows bool [heads, q_blocks, k_blocks], the
    first ``k_valid`` key blocks real, the rest padding; the columns go to the kernel in ``ring`` steps.

    Counted as kernels/nabla.py and kernels/flex.py allocate them, E = heads * q_blocks * k_blocks elements:
    - the STA prior of the whole padded grid, cached: k_blocks**2 bools;
    - building (nabla_block_mask): the rows being filled (1 byte per element; with padding a zero-filled E and the
      real columns' E_valid) and one chunk of the top-CDF rule (_top_cdf, as many heads as fit 2**24 elements, at
      least one) at its peak: fp32 scores 4, sorted values 4 and int64 order 8 (the softmax they were sorted from
      is freed), fp32 cumsum 4 and its bool 1 = 21 bytes per chunk element; then ``mask | sta_rows`` (and the
      sequence-parallel ``& q_valid``) make one more bool copy;
    - the kernel (flex.block_mask_from_tiles, its tile indices from flex.kv_tiles), per ring step on E / ring
      elements, beside the whole rows: the step's columns (a bool copy when ring > 1), then at most 12 bytes per
      element: the int32 running count (with the int32 copy of the bools the cumsum makes, 8), then beside it the
      unselected tiles' positions and the positions of all (4 + 4 + 4), the int64 positions scatter takes beside
      their int32 source (8 + 4), the int32 indices beside the int64 positions (4 + 8); and the rows' tile counts
      (int32 per row) and the key-index ramp (int32 per key tile of the step).
    The sort kernels' own scratch is not counted.
    """
    from k5.kernels import nabla as nabla_kernels

    k_valid = k_blocks if k_valid is None else k_valid
    E = heads * q_blocks * k_blocks
    E_valid = heads * q_blocks * k_valid
    padded = E if k_valid < k_blocks else 0
    per_head = max(1, q_blocks * k_valid)
    chunk = min(heads, max(1, nabla_kernels._MASK_CHUNK_ELEMS // per_head)) * per_head
    building = padded + max(E_valid + _TOP_CDF_BYTES * chunk, 2 * E_valid)
    step = -(-E // ring)
    kernel = E + ((1 if ring > 1 else 0) + _TILE_INDEX_BYTES) * step + 4 * heads * q_blocks + 4 * -(-k_blocks // ring)
    return k_blocks * k_blocks + max(building, 2 * E, kernel)


def dit_activation_bytes(cfg, shape: Shape, dtype: torch.dtype, nabla: bool, sp: int = 1, ulysses: int = 1,
                         ring: int = 1, tp: int = 1) -> int:
    """Peak activation bytes of one DiT forward on one rank (see the module docstring for what is counted)."""
    T = (shape.frames - 1) // 4 + 1
    tokens = T * (shape.height // 16) * (shape.width // 16)
    blocks = -(-tokens // 64)
    local = -(-blocks // sp) * 64  # padded whole blocks per rank (parallel/layout.py)
    act = local * block_bytes_per_token(cfg, dtype, ulysses, ring, tp)
    act += tokens * cfg.head_dim // 2 * 4 * 3  # RoPE angles, cos, sin (fp32)
    act += tokens * 2 * cfg.in_visual_dim * 4 * 4  # latent state, model input, velocities (fp32)
    if nabla:
        # After the Ulysses all-to-all a rank holds heads/ulysses of its ring span's ulysses * local tokens, and its
        # mask rows cover every key block of the padded sequence (parallel/usp.py, parallel/ring.py).
        heads = max(1, max(1, cfg.num_heads // tp) // ulysses)
        act += nabla_mask_bytes(heads, ulysses * local // 64, sp * local // 64, blocks, ring)
    return int(act * _FRAGMENTATION)


def decode_bytes(root: Path | None, shape: Shape, device_type: str) -> int:
    """Peak bytes of a tiled VAE decode on the device: the decoded video, its uint8 conversion (two fp32
    temporaries and the result) and one tile's decoder activations at full resolution."""
    vae_b = vae_dtype(device_type).itemsize
    video = 3 * shape.frames * shape.height * shape.width
    channels, tile, tile_frames = 128, 256, 16
    if root is not None:
        try:
            c = json.loads((Path(root) / "vae" / "config.json").read_text())
            channels = c.get("block_out_channels", [channels])[0]
            tile, tile_frames = c.get("tile_sample_min_height", tile), c.get("tile_sample_min_num_frames", tile_frames)
        except (OSError, ValueError):
            pass
    tile_act = 8 * channels * (min(tile_frames, shape.frames) + 1) * min(tile, shape.height) * min(tile, shape.width)
    return int((video * (vae_b + 2 * 4 + 2) + tile_act * vae_b) * _FRAGMENTATION)


# diffusers' AutoencoderKLHunyuanVideo tiling as k5 runs it (engine/vae/video.py enables tiling without overrides; the sizes
# are the library's __init__ defaults, not in config.json): spatial tiles of 256 px every 192, temporal windows of 16
# frames every 12, framewise decoding on.
_VAE_TILING = dict(tile_sample_min_height=256, tile_sample_min_width=256, tile_sample_min_num_frames=16,
                   tile_sample_stride_height=192, tile_sample_stride_width=192, tile_sample_stride_num_frames=12,
                   use_tiling=True, use_framewise_decoding=True)


def vae_gather_bytes(root: Path | None, shape: Shape, device_type: str, ranks: int) -> int:
    """Bytes of the tile buffers on the rank that collects a decode split over ``ranks`` ranks (parallel/vae_tiles.py
    with dst 0): its own packed tiles and one receive buffer per rank, each the size of the largest rank's share of
    the tile plan. 0 on one rank. The plan is the one every rank computes, from the VAE config's ratios and the
    library's tile sizes."""
    if ranks <= 1:
        return 0
    from types import SimpleNamespace

    from k5.parallel.vae_tiles import assign_tiles, decoded_shape, plan_tiles

    c = {}
    if root is not None:
        try:
            c = json.loads((Path(root) / "vae" / "config.json").read_text())
        except (OSError, ValueError):
            pass
    sr, tr = c.get("spatial_compression_ratio", 8), c.get("temporal_compression_ratio", 4)
    ae = SimpleNamespace(spatial_compression_ratio=sr, temporal_compression_ratio=tr,
                         config=SimpleNamespace(out_channels=c.get("out_channels", 3)), **_VAE_TILING)
    tiles = plan_tiles(((shape.frames - 1) // tr + 1, shape.height // sr, shape.width // sr), ae)
    numel = [math.prod(decoded_shape(t, ae, 1)) for t in tiles]
    capacity = max(sum(numel[i] for i in ids) for ids in assign_tiles(tiles, ranks))
    return (ranks + 1) * capacity * vae_dtype(device_type).itemsize


def nccl_bytes(sp: int = 1, ulysses: int = 1, ring: int = 1, tp: int = 1, cfg_degree: int = 1, dp: int = 1) -> int:
    """NCCL buffers one rank holds (see NCCL_COMMUNICATOR): one communicator per process group of several ranks that
    it runs collectives on (parallel/mesh.py's groups, each its own: the world's barrier, the item's decode and stop
    agreement, the text replica's broadcast, the sequence's gather, tp, cfg, ulysses, ring), and buffers per peer of
    its all-to-all and point-to-point exchanges (Ulysses: the ulysses - 1 others; ring: the next and previous rank).
    """
    world = dp * cfg_degree * sp * tp
    if world == 1:
        return 0
    groups = (world, cfg_degree * sp * tp, sp * tp, sp, tp, cfg_degree, ulysses, ring)
    peers = (ulysses - 1) + min(2, ring - 1)
    return sum(n > 1 for n in groups) * NCCL_COMMUNICATOR + peers * NCCL_PEER


@dataclass
class Estimate:
    """Estimated peak bytes per rank of each phase of the largest item."""

    phases: dict[str, int]
    weights: Weights
    offload: str

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.phases.items())
        w = self.weights
        return (f"{self.peak / GiB:.1f} GiB at its peak ({parts} GiB by phase; weights: DiT {w.dit / GiB:.1f}, text "
                f"encoders {w.text / GiB:.1f}, VAE {w.vae / GiB:.2f} GiB; --offload {self.offload})")


def estimate(weights: Weights, cfg, shapes: list[Shape], dtype: torch.dtype, device_type: str, offload: str,
             nabla: bool, root: Path | None = None, *, sp: int = 1, ulysses: int = 1, ring: int = 1, tp: int = 1,
             cfg_degree: int = 1, dp: int = 1, keep_text: bool = False, image: bool = False) -> Estimate:
    """Peak bytes per rank of each phase for the largest of ``shapes``, on the worst rank of the layout (sp, ulysses,
    ring, tp, ``cfg_degree``, dp): with more than one process the text source rank, which also collects the decoded
    tiles. ``keep_text``: a multi-process job of several items, whose text source keeps the encoders on the device
    (parallel/text_share.py, keep=True); ``image``: an image model, decoded whole on one rank (no tile gather)."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
    layout = dict(sp=sp, ulysses=ulysses, ring=ring, tp=tp)
    world = dp * cfg_degree * sp * tp
    act = max(dit_activation_bytes(cfg, s, dtype, nabla, **layout) for s in shapes)
    ranks = 1 if image else cfg_degree * sp * tp
    dec = max(decode_bytes(root, s, device_type) + vae_gather_bytes(root, s, device_type, ranks) for s in shapes)
    w = weights
    # two prompts of the template + 256 tokens, a few fp32 hidden states of Qwen's width (the DiT's text input)
    text_act = 2 * 400 * 4 * cfg.in_text_dim * 4
    if world > 1 and offload != "model":
        # The encoders (on the text source) are outside --offload's reach: freed after a single video's encode,
        # kept on the device through a batch.
        kept = w.text if keep_text else 0
        phases = {"text": w.dit + w.vae + w.text + text_act, "denoise": w.dit + w.vae + kept + act,
                  "decode": w.dit + w.vae + kept + dec}
    elif offload == "model":
        phases = {"text": w.text + text_act, "denoise": w.dit + act, "decode": w.vae + dec}
    elif offload == "text":
        phases = {"text": w.dit + w.vae + w.text + text_act, "denoise": w.dit + w.vae + act, "decode": w.dit + w.vae + dec}
    else:
        every = w.dit + w.vae + w.text
        phases = {"text": every + text_act, "denoise": every + act, "decode": every + dec}
    runtime = _RUNTIME
    if device_type == "cuda":
        runtime += CUBLAS_WORKSPACE + nccl_bytes(**layout, cfg_degree=cfg_degree, dp=dp)
    return Estimate({k: v + runtime for k, v in phases.items()}, w, offload)


def device_capacity(device) -> tuple[int, str]:
    """Bytes this process can still use on ``device`` and where that number comes from."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"{device} ({free / GiB:.1f} of {total / GiB:.1f} GiB free)"
    available = _meminfo("MemAvailable")
    cgroup = _cgroup_room()
    if cgroup is not None and cgroup < available:
        return cgroup, f"this process's cgroup ({cgroup / GiB:.1f} GiB left under its limit)"
    return available, f"the CPU's memory ({available / GiB:.1f} GiB available)"


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def refuse_if_too_big(est: Estimate, capacity: int, where: str, alternatives: dict[str, Estimate]) -> None:
    """Raise ValueError when the estimate exceeds ``capacity``, naming what would fit among ``alternatives``
    ({flags: estimate}), else the largest frame count that would."""
    if est.peak <= capacity:
        return
    fits = [flags for flags, alt in alternatives.items() if alt.peak <= capacity]
    hint = f"these settings would fit: {'; '.join(fits)}" if fits else "no --offload setting fits it either"
    raise ValueError(
        f"this run needs an estimated {est.describe()}, more than the {capacity / GiB:.1f} GiB of {where}; {hint}"
    )


def check_memory(checkpoint, cfg, shapes: list[Shape], dtype: torch.dtype, device, offload: str, nabla: bool,
                 lm_head: bool = False, vision: bool = False, **layout: int) -> Estimate:
    """Estimate this rank's peak for the largest of ``shapes`` and refuse (ValueError) a run that cannot fit the
    device, naming the --offload setting or the frame count that would. ``checkpoint``: the checked
    engine.checkpoints.files.Checkpoint (its headers; configs are read). ``layout``: estimate's keywords (degrees,
    keep_text)."""
    from k5.engine.checkpoints.dit import open_checkpoint

    device, checkpoint = torch.device(device), open_checkpoint(checkpoint)
    weights = Weights.of_checkpoint(checkpoint, cfg, dtype, device.type, tp=layout.get("tp", 1), lm_head=lm_head,
                                    vision=vision)
    root, image = checkpoint.root, checkpoint.image

    def at(mode: str, these: list[Shape]) -> Estimate:
        return estimate(weights, cfg, these, dtype, device.type, mode, nabla, root, image=image, **layout)

    est = at(offload, shapes)
    capacity, where = device_capacity(device)
    if est.peak <= capacity:
        return est
    alternatives = {}
    one_process = math.prod(layout.get(k, 1) for k in ("dp", "cfg_degree", "sp", "tp")) == 1
    modes = [m for m in OFFLOAD_MODES if m != offload and (one_process or m != "model")]  # model: one process only
    if device.type == "cuda":
        for mode in modes:
            alternatives[f"--offload {mode}"] = at(mode, shapes)
    best = "model" if device.type == "cuda" and one_process else offload
    big = max(shapes, key=lambda s: s.frames * s.height * s.width)
    lo, hi = 0, (big.frames - 1) // 4 - 1  # frames 4k+1, fewer than now
    fits = None
    while lo <= hi:
        k = (lo + hi) // 2
        if at(best, [Shape(4 * k + 1, big.height, big.width)]).peak <= capacity:
            fits, lo = k, k + 1
        else:
            hi = k - 1
    if fits is not None:
        flags = f"--num-frames {4 * fits + 1}" + (f" --offload {best}" if best != offload else "")
        alternatives[flags] = at(best, [Shape(4 * fits + 1, big.height, big.width)])
    refuse_if_too_big(est, capacity, where, alternatives)
    return est
