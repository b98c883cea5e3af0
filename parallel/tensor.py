"""Tensor parallelism for a Kandinsky5DiT on the "tp" dim of the one mesh (gpt-fast tp.py style).

Every Linear of a transformer block is cut, the rest (embeddings, norms, the final projection: under 0.2 % of Pro)
stays replicated:
- column-wise (output rows of weight and bias): to_query / to_key / to_value of self- and cross-attention, and the
  FFN in_layer. A rank computes whole heads (Attention.qkv unflattens by head_dim, so it sees H/tp heads with no
  change to the model) and a slice of the FFN hidden; q/k RMSNorm is per head and needs no communication.
- row-wise (input columns of the weight): attention out_layer and FFN out_layer. The partial products are
  all-reduced over the tp group and the bias (replicated) is added once after the sum.
- column-wise + all-gather: the adaLN modulation Linears (time_dim -> n*D, fp32). They are 12 % of a Pro block and,
  kept in fp32, 9 GB of the model, so they are split; their output is one [B, n*D] vector per forward whose
  all-gather is negligible (147 KB for a Pro visual block).
Text blocks and visual blocks are cut the same way. Per forward a visual block all-reduces 3 times ([B, S_local, D]
each: self-attn, cross-attn, FFN) and all-gathers once; a text block all-reduces twice.

Build order on a rank: model on meta -> ``apply_tensor_parallel`` (shrinks the Linears to the local shard) ->
``checkpoint.load_into`` with ``tp_reader`` (reads only this rank's rows/columns) -> sequence parallelism.
``load_rank_dit`` does the first three. ``apply_tensor_parallel`` also cuts an already filled model (tests).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from k5.engine.checkpoints import dit as checkpoint
from k5.engine.checkpoints import lora
from k5.engine.model.config import DiTConfig
from k5.engine.model.dit import Kandinsky5DiT
from k5.parallel.comm_stats import CommStats, nbytes
from k5.parallel.mesh import ParallelDims

COLWISE, ROWWISE, GATHERED = "colwise", "rowwise", "colwise_gathered"

# Module name (suffix after a "." boundary) -> how it is cut. The only place that knows which layers split.
PLAN = {
    "self_attention.to_query": COLWISE,
    "self_attention.to_key": COLWISE,
    "self_attention.to_value": COLWISE,
    "self_attention.out_layer": ROWWISE,
    "cross_attention.to_query": COLWISE,
    "cross_attention.to_key": COLWISE,
    "cross_attention.to_value": COLWISE,
    "cross_attention.out_layer": ROWWISE,
    "feed_forward.in_layer": COLWISE,
    "feed_forward.out_layer": ROWWISE,
    "visual_modulation.out_layer": GATHERED,
    "text_modulation.out_layer": GATHERED,
    "modulation.out_layer": GATHERED,  # the final OutLayer's modulation
    # Kandinsky 6's cross-modal layers (its stream blocks are the ones above): queries of one stream, keys and values
    # projected from the other; whole heads per rank as for the rest.
    "va_cross_attention.to_query": COLWISE,
    "va_cross_attention.to_key": COLWISE,
    "va_cross_attention.to_value": COLWISE,
    "va_cross_attention.out_layer": ROWWISE,
    "av_cross_attention.to_query": COLWISE,
    "av_cross_attention.to_key": COLWISE,
    "av_cross_attention.to_value": COLWISE,
    "av_cross_attention.out_layer": ROWWISE,
    "va_modulation.out_layer": GATHERED,
    "av_modulation.out_layer": GATHERED,
}


def split_style(module_name: str) -> str | None:
    """How the module named ``module_name`` (e.g. 'visual_transformer_blocks.3.feed_forward.in_layer') is cut."""
    dotted = "." + module_name
    for suffix, style in PLAN.items():
        if dotted.endswith("." + suffix):
            return style
    return None


def shard_dim(param_name: str) -> int | None:
    """The dim a checkpoint tensor is cut along under TP (0: rows, 1: columns), None if it is replicated."""
    module_name, _, attr = param_name.rpartition(".")
    style = split_style(module_name)
    if style is None:
        return None
    if style == ROWWISE:
        return 1 if attr == "weight" else None  # the row-wise bias is added once, after the all-reduce
    return 0


def _span(full: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if full % size:
        raise ValueError(f"{what} has {full} rows/columns, which do not divide by --tp-degree {size}")
    n = full // size
    return rank * n, (rank + 1) * n


def all_reduce_bytes(t: Tensor, group_size: int) -> int:
    """Bytes a rank sends in a ring all-reduce (reduce-scatter + all-gather): 2 (n-1)/n of the buffer."""
    return 2 * nbytes(t) * (group_size - 1) // group_size


class TPLinear(nn.Module):
    """A Linear holding this rank's shard of the checkpoint weight; parameter names stay ``weight`` / ``bias``.

    colwise: y_local = x W_r^T + b_r (this rank's output features);
    rowwise: y = all_reduce(x_local W_r^T) + b (x_local: this rank's input features);
    colwise_gathered: the colwise output all-gathered along the last dim (the full output on every rank).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, style: str, group, stats: CommStats):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.style, self.group, self.stats = style, group, stats
        self.size = dist.get_world_size(group)

    @classmethod
    def cut(cls, linear: nn.Linear, style: str, rank: int, group, stats: CommStats, name: str) -> "TPLinear":
        size = dist.get_world_size(group)
        dim = 1 if style == ROWWISE else 0
        a, b = _span(linear.weight.shape[dim], rank, size, name)
        # clone: a slice of a filled weight would keep the full storage alive (no-op on meta)
        weight = linear.weight.detach().narrow(dim, a, b - a).clone()
        bias = linear.bias
        if bias is not None:
            bias = bias.detach().clone() if style == ROWWISE else bias.detach()[a:b].clone()
        return cls(weight, bias, style, group, stats)

    def sharded_parameters(self) -> list[Tensor]:
        return [self.weight] if self.style == ROWWISE or self.bias is None else [self.weight, self.bias]

    def forward(self, x: Tensor) -> Tensor:
        if self.style == COLWISE:
            return F.linear(x, self.weight, self.bias)
        if self.style == ROWWISE:
            y = F.linear(x, self.weight)
            dist.all_reduce(y, group=self.group)
            self.stats.add("all_reduce", all_reduce_bytes(y, self.size))
            return y if self.bias is None else y + self.bias
        y = F.linear(x, self.weight, self.bias).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.size)]
        dist.all_gather(parts, y, group=self.group)
        self.stats.all_gather(y, self.size)
        return torch.cat(parts, -1)

    def extra_repr(self) -> str:
        return f"{self.style}, local weight {tuple(self.weight.shape)}, tp {self.size}"


def apply_tensor_parallel(dit: Kandinsky5DiT, dims: ParallelDims, stats: CommStats | None = None) -> CommStats:
    """Cut ``dit``'s block Linears to this rank's tp shard (meta or filled weights); return the byte counter."""
    stats = stats if stats is not None else CommStats()
    if dims.tp == 1:
        return stats
    dims.check_model(dit.config.num_heads, dit.config.ff_dim)
    group, rank = dims.group("tp"), dims.rank("tp")
    for name, module in list(dit.named_modules()):
        style = split_style(name)
        if style is None:
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}; the tensor-parallel plan expects an nn.Linear")
        dit.set_submodule(name, TPLinear.cut(module, style, rank, group, stats, name))
    return stats


def shard_reader(rank: int, size: int) -> checkpoint.Reader:
    """A ``checkpoint.load_into`` reader that reads only tp rank ``rank``'s slice of every split tensor."""

    def read(name: str, sl, shape: torch.Size) -> Tensor:
        dim = shard_dim(name)
        if dim is None or size == 1:
            return sl[:]
        a, b = _span(sl.get_shape()[dim], rank, size, name)
        # safetensors slices read just these rows / columns from the file, never the whole tensor
        return sl[a:b] if dim == 0 else sl[:, a:b]

    return read


def tp_reader(dims: ParallelDims) -> checkpoint.Reader:
    return shard_reader(dims.rank("tp"), dims.tp)


def lora_factor_reader(rank: int, size: int) -> lora.FactorReader:
    """An ``engine.checkpoints.lora`` factor reader that reads only what tp rank ``rank``'s slice of the weight needs.

    W + B @ A restricted to rows r of a column-parallel weight is W[r] + B[r] @ A, and to columns c of a row-parallel
    weight W[:, c] + B @ A[:, c]: B's rows or A's columns are cut along the weight's own split, the other factor
    (rank x features, small) is read whole."""

    def read(weight: str, which: str, sl) -> Tensor:
        dim = shard_dim(weight)
        if size == 1 or (dim, which) not in ((0, "B"), (1, "A")):
            return sl[:]
        a, b = _span(sl.get_shape()[dim], rank, size, f"LoRA factor {which} of {weight}")
        return sl[a:b] if dim == 0 else sl[:, a:b]

    return read


def tp_factor_reader(dims: ParallelDims) -> lora.FactorReader:
    return lora_factor_reader(dims.rank("tp"), dims.tp)


def load_rank_dit(path_or_files, dims: ParallelDims, dtype: torch.dtype = torch.bfloat16, device="cpu",
                  stats: CommStats | None = None, config: DiTConfig | None = None,
                  reader: checkpoint.Reader | None = None, adapters=(),
                  factor_reader: lora.FactorReader | None = None) -> tuple[Kandinsky5DiT, CommStats]:
    """This rank's DiT: built on meta, cut for this rank, filled with this rank's slices only (mesh already built),
    the LoRA ``adapters`` (engine.checkpoints.lora.open_lora) merged into those slices as they are read.

    ``path_or_files``: a checkpoint folder or file, or its located ``DiTFiles``. ``reader`` / ``factor_reader``
    default to ``tp_reader(dims)`` / ``tp_factor_reader(dims)`` (tests pass recording wrappers of them)."""
    stats = stats if stats is not None else CommStats()
    dit = checkpoint.load_dit(path_or_files, dtype, device, config=config, reader=reader or tp_reader(dims),
                              prepare=lambda model: apply_tensor_parallel(model, dims, stats), adapters=adapters,
                              factor_reader=factor_reader or tp_factor_reader(dims))
    return dit, stats


def switch_dit_adapters(dit: Kandinsky5DiT, path_or_files, dims: ParallelDims, adapters,
                        reader: checkpoint.Reader | None = None,
                        factor_reader: lora.FactorReader | None = None) -> list[str]:
    """``engine.checkpoints.dit.switch_adapters`` for a DiT loaded by ``load_rank_dit``: each rank re-reads its own
    slices of the touched base tensors and merges its slices of the new factors (no communication)."""
    return checkpoint.switch_adapters(dit, path_or_files, adapters, reader or tp_reader(dims),
                                      factor_reader or tp_factor_reader(dims))


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters this rank holds: {"split": tp-sharded tensors, "replicated": the rest, "total"}."""
    split_ids = {id(p) for m in model.modules() if isinstance(m, TPLinear) for p in m.sharded_parameters()}
    out = {"split": 0, "replicated": 0}
    for p in model.parameters():
        out["split" if id(p) in split_ids else "replicated"] += nbytes(p)
    out["total"] = out["split"] + out["replicated"]
    return out


def format_parameter_bytes(b: dict[str, int]) -> str:
    """One line for a ``parameter_bytes`` result, printed by every rank at start."""
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"
    return (f"DiT parameters on this rank {gib(b['total'])} "
            f"({gib(b['split'])} tp-split, {gib(b['replicated'])} replicated)")
