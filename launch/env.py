"""Where this process runs: its place in the job (torchrun's variables) and its device, chosen from --device
before anything loads; and the fast-path defaults the device decides (--compile, --offload)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(spec: str | None, local_rank: int, ranks_here: int = 1) -> torch.device:
    """The device a rank runs on: ``--device cuda`` (no index) is ``cuda:LOCAL_RANK``, as torchrun numbers
    a node's GPUs; no ``--device`` is the same when CUDA is available, else the CPU. Raises ValueError (before
    anything loads) for CUDA where there is none, and for ``cuda:N`` when ``ranks_here`` > 1 processes of the job
    run on this machine: every one of them would take GPU N, and NCCL refuses that only after the weights load."""
    if spec is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and ranks_here > 1:
        raise ValueError(f"--device {spec} puts all {ranks_here} ranks on this machine on GPU {device.index} (NCCL "
                         f"fails with 'Duplicate GPU detected'); use --device cuda, which is cuda:LOCAL_RANK on "
                         f"each rank")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {spec}: CUDA is not available here ({why}, torch {torch.__version__}); "
                             f"use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1} or --device cuda under torchrun")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec}: k5 runs on cpu or cuda; use one of those")
    return device



@dataclass
class Env:
    world: int
    rank: int
    local_rank: int
    device: torch.device
    estimate: object = None  # engine.memory.Estimate of this rank's peak, made before loading


def detect_env(args) -> Env:
    """World, rank and device; raises ValueError for a device this machine does not have (before anything loads)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # The job's processes on this machine: torchrun's LOCAL_WORLD_SIZE (else the world), or the workers to start.
    ranks_here = max(int(os.environ.get("LOCAL_WORLD_SIZE", world)), args.nproc_per_node or 1)
    device = resolve_device(args.device, local_rank, ranks_here)
    # The fast path's defaults depend on the device: compiled and text encoders off the GPU with CUDA.
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.offload is None:
        args.offload = "text" if device.type == "cuda" else "none"
    if args.offload == "model" and max(world, args.nproc_per_node or 1) > 1:
        raise ValueError("--offload model runs one process; with several GPUs split the DiT with --tp-degree instead")
    return Env(world, rank, local_rank, device)
