"""Shard-wise loading under tensor parallelism: each rank reads only its slices, for every checkpoint layout.

A recording wrapper around the safetensors slices logs every read; the split tensors are named here by their own
pattern (not by k5.parallel.tensor's plan), and the loaded shards are compared with slices of the full tensors.
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distributed import run_distributed
from k5.engine.checkpoints.dit import keeps_fp32
from k5.engine.model.config import DiTConfig
from k5.engine.model.dit import Kandinsky5DiT
from k5.parallel.mesh import ParallelDims
from k5.parallel.tensor import load_rank_dit, parameter_bytes, tp_reader

CFG = DiTConfig(in_text_dim=24, in_text_dim2=12, time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1,
                num_visual_blocks=2, axes_dims=(4, 6, 6))  # 4 heads
# Pro widths and head count (model_dim 4096, 32 heads of 128, ff 16384, time_dim 1024), one block of each kind.
PRO = DiTConfig(in_text_dim=64, in_text_dim2=32, time_dim=1024, model_dim=4096, ff_dim=16384, num_text_blocks=1,
                num_visual_blocks=1, axes_dims=(32, 48, 48))

# Tensors TP must split, and along which dim: q/k/v and FFN-in rows (+ bias), out_layer / FFN-out columns,
# modulation rows (+ bias). Written from the architecture, independently of the plan in parallel/tensor.py.
ROWS = re.compile(r"(attention\.to_(query|key|value)|feed_forward\.in_layer|modulation\.out_layer)\.(weight|bias)$")
COLUMNS = re.compile(r"(attention\.out_layer|feed_forward\.out_layer)\.weight$")


def split_dim(name: str) -> int | None:
    return 0 if ROWS.search(name) else 1 if COLUMNS.search(name) else None


def build_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return Kandinsky5DiT(cfg).eval()


def write_checkpoint(tensors: dict, cfg: DiTConfig, folder: Path, layout: str) -> Path:
    """Write ``tensors`` in one checkpoint layout; return what to pass to load_dit / load_rank_dit.

    diffusers: transformer/ with config.json and one file; sharded: the same with two shards and the index;
    original: one .safetensors file (with config.json beside it: head_dim 16 is no released model).
    """
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if layout == "original":
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "kandinsky5.safetensors")
        (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
        return folder / "kandinsky5.safetensors"
    t = folder / "transformer"
    t.mkdir(parents=True, exist_ok=True)
    (t / "config.json").write_text(json.dumps(cfg.to_dict()))
    if layout == "diffusers":
        save_file(tensors, t / "diffusion_pytorch_model.safetensors")
    else:
        names = sorted(tensors)
        shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
        for f, ks in shards.items():
            save_file({k: tensors[k] for k in ks}, t / f)
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (t / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


class RecordingSlice:
    """A safetensors slice that logs (name, full shape, key, shape returned) for every read."""

    def __init__(self, sl, name, log):
        self.sl, self.name, self.log = sl, name, log

    def get_shape(self):
        return self.sl.get_shape()

    def get_dtype(self):
        return self.sl.get_dtype()

    def __getitem__(self, key):
        t = self.sl[key]
        key = key if isinstance(key, tuple) else (key,)
        spans = tuple((k.start, k.stop) if isinstance(k, slice) else k for k in key)
        self.log.append((self.name, tuple(self.sl.get_shape()), spans, tuple(t.shape)))
        return t


def recording(reader, log):
    return lambda name, sl, shape: reader(name, RecordingSlice(sl, name, log), shape)


def check_reads(logs: list[list], tp: int) -> None:
    """Every split tensor: read once per rank, a 1/tp slice each, the ranks' slices disjoint and covering it."""
    spans = {}
    for rank, log in enumerate(logs):
        names = [n for n, *_ in log]
        assert len(names) == len(set(names)), f"rank {rank} read a tensor twice"
        for name, full, key, got in log:
            dim = split_dim(name)
            if dim is None:
                assert got == full, f"rank {rank} read {got} of the replicated {name} {full}"
                continue
            want = tuple(s // tp if d == dim else s for d, s in enumerate(full))
            assert got == want, f"rank {rank} read {got} of {name} {full}, not a 1/{tp} slice along dim {dim}"
            spans.setdefault(name, []).append((key[dim], full[dim]))
    for name, s in spans.items():
        s.sort()
        assert len(s) == tp and s[0][0][0] == 0 and s[-1][0][1] == s[-1][1], (name, s)
        assert all(s[i][0][1] == s[i + 1][0][0] for i in range(tp - 1)), (name, s)


def _load_worker(rank, world_size, paths):
    dims = ParallelDims(tp=world_size)
    dims.build_mesh("cpu")
    out = []
    for path in paths:
        log = []
        model, _ = load_rank_dit(path, dims, torch.float32, reader=recording(tp_reader(dims), log))
        out.append((log, {k: v.clone() for k, v in model.state_dict().items()}))
    return out


def test_tp_reads_only_its_slices_in_every_layout(tmp_path):
    full = build_model().state_dict()
    layouts = ("diffusers", "sharded", "original")
    paths = [write_checkpoint(full, CFG, tmp_path / layout, layout) for layout in layouts]
    tp = 2
    results = run_distributed(_load_worker, tp, paths)
    for i, layout in enumerate(layouts):
        logs = [results[r][i][0] for r in range(tp)]
        assert len(logs[0]) == len(full), layout  # every tensor read, each once
        check_reads(logs, tp)
        for rank in range(tp):
            state = results[rank][i][1]
            assert state.keys() == full.keys()
            for name, want in full.items():
                dim = split_dim(name)
                if dim is not None:
                    want = want.chunk(tp, dim)[rank]
                assert torch.equal(state[name], want), (layout, rank, name)


def write_pro_checkpoint(folder: Path) -> dict[str, tuple[int, ...]]:
    """Random bf16 weights of the Pro-shaped model, diffusers layout in two shards; returns the tensor shapes."""
    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in Kandinsky5DiT(PRO).named_parameters()}
    # Random values cycled from one pool: 540M fresh normals would take seconds, a copy of a pool does not.
    pool = torch.randn(2**22 + 17, generator=torch.Generator().manual_seed(0)).bfloat16()
    t = folder / "transformer"
    t.mkdir(parents=True)
    (t / "config.json").write_text(json.dumps(PRO.to_dict()))
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": [k for k in shapes if k.startswith("visual_")],
              "diffusion_pytorch_model-00002-of-00002.safetensors": [k for k in shapes if not k.startswith("visual_")]}
    offset = 0
    for f, names in shards.items():
        tensors = {}
        for k in names:
            n = math.prod(shapes[k])
            reps = -(-(offset % pool.numel() + n) // pool.numel())
            tensors[k] = pool.repeat(reps)[offset % pool.numel():][:n].view(shapes[k]).clone()
            offset += 1_000_003
        save_file(tensors, t / f)
        del tensors
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (t / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return shapes


def _pro_worker(rank, world_size, path, probes):
    dims = ParallelDims(tp=world_size)
    dims.build_mesh("cpu")
    log = []
    model, _ = load_rank_dit(path, dims, torch.bfloat16, reader=recording(tp_reader(dims), log))
    params = dict(model.named_parameters())
    corners = {name: params[name][:2, :8].float().clone() for name in probes}
    return log, parameter_bytes(model), {k: tuple(p.shape) for k, p in params.items()}, corners


def test_pro_shaped_per_rank_bytes_and_reads(tmp_path):
    tp = 2
    shapes = write_pro_checkpoint(tmp_path)
    probes = ["visual_transformer_blocks.0.self_attention.to_query.weight",
              "visual_transformer_blocks.0.feed_forward.out_layer.weight",
              "text_transformer_blocks.0.text_modulation.out_layer.weight"]
    results = run_distributed(_pro_worker, tp, tmp_path, probes)

    itemsize = lambda name: 4 if keeps_fp32(name) else 2  # modulation stays fp32, the rest bf16
    split_total = sum(math.prod(s) * itemsize(k) for k, s in shapes.items() if split_dim(k) is not None)
    full_total = sum(math.prod(s) * itemsize(k) for k, s in shapes.items())
    assert split_total > 0.9 * full_total  # the test is about the bulk of the model
    check_reads([r[0] for r in results], tp)

    shard_files = sorted((tmp_path / "transformer").glob("*.safetensors"))
    for rank, (log, nbytes, local_shapes, corners) in enumerate(results):
        assert abs(nbytes["split"] - split_total / tp) <= 0.05 * split_total / tp, (rank, nbytes, split_total)
        assert nbytes["total"] <= 1.05 * full_total / tp, (rank, nbytes, full_total)
        for name, shape in shapes.items():
            dim = split_dim(name)
            want = shape if dim is None else tuple(s // tp if d == dim else s for d, s in enumerate(shape))
            assert local_shapes[name] == want, name
        # The loaded values are this rank's rows / columns of the file (read back here by plain safetensors).
        for name in probes:
            dim = split_dim(name)
            f = next(p for p in shard_files if name in safe_open(str(p), "pt").keys())
            with safe_open(str(f), "pt") as h:
                sl = h.get_slice(name)
                n = shapes[name][dim] // tp
                want = sl[rank * n : rank * n + 2, :8] if dim == 0 else sl[:2, rank * n : rank * n + 8]
            assert torch.equal(corners[name], want.float()), (rank, name)
