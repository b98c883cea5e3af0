"""Encode the prompts once per group and broadcast the embeddings, so only one rank holds the text encoders.

Every rank of a model replica (the ranks that share dp and cfg coordinates: ring x ulysses x tp) needs the same
text embeddings, but the 7B Qwen2.5-VL costs 15 GB in bf16. One rank per replica (its rank 0 in the flattened
("ring", "ulysses", "tp") group) loads the encoders, encodes, broadcasts the few MB of embeddings, and frees the
encoders unless asked to keep them (batch jobs encode again). The other ranks never load them.
With CFG parallelism the two halves are two replicas, so each half's source encodes only its own prompt
(k5.parallel.cfg.BranchText on top of this).

Splitting the Qwen model itself across the ranks of a node is not done: one 15 GB encoder on one rank per replica
fits the GPUs this targets, and it runs once per video.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from k5.engine.encoders.text import TextEmbeds
from k5.parallel.comm_stats import CommStats, nbytes
from k5.parallel.mesh import ParallelDims

def is_text_source(dims: ParallelDims) -> bool:
    """Whether this rank loads the text encoders (rank 0 of its model replica)."""
    return dims.rank("replica") == 0


class SharedText:
    """``encode(prompts, fmt, images) -> TextEmbeds`` like engine.encoders.text.TextEncoder; runs the encoder on the group's rank 0 only.

    ``encoder`` is the loaded TextEncoder on the source rank and None elsewhere; ``device`` is where receiving ranks
    put the embeddings (the DiT's device). With ``keep=False`` the encoder is released after the first encode.
    """

    def __init__(self, encoder, group, device, keep: bool = False, stats: CommStats | None = None):
        self.group, self.device, self.keep = group, torch.device(device), keep
        self.source = dist.get_rank(group) == 0
        self.stats = stats if stats is not None else CommStats()
        if self.source and encoder is None:
            raise ValueError("the text source rank (rank 0 of its replica) needs a loaded TextEncoder")
        self.encoder = encoder if self.source else None

    @classmethod
    def for_dims(cls, encoder, dims: ParallelDims, device, keep: bool = False, stats: CommStats | None = None):
        return cls(encoder, dims.group("replica"), device, keep, stats)

    def encode(self, prompts: list[str], **kwargs) -> TextEmbeds:
        """As TextEncoder.encode; ``kwargs`` (``fmt``, and ``images``: an image edit's source, one per prompt) go to
        the encoder on the source rank only. The embeddings' shapes travel in the header (an edit prompt is as long
        as its image makes it)."""
        if self.source:
            if self.encoder is None:
                raise RuntimeError("the text encoder was released after the first encode; pass keep=True to reuse it")
            e = self.encoder.encode(prompts, **kwargs)
            header = [[(tuple(t.shape), t.dtype) for t in (e.embeds, e.mask, e.pooled)], list(e.truncated)]
            tensors = [t.to(self.device).contiguous() for t in (e.embeds, e.mask, e.pooled)]
        else:
            header = [None, None]
        # Shapes and dtypes first (one small object broadcast), then the tensors themselves.
        dist.broadcast_object_list(header, group_src=0, group=self.group, device=self._comm_device())
        specs, truncated = header
        if not self.source:
            tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs]
        n = dist.get_world_size(self.group)
        for t in tensors:
            dist.broadcast(t, group_src=0, group=self.group)
            if self.source:
                self.stats.add("broadcast", nbytes(t) * (n - 1))
        if self.source and not self.keep:
            self.release()
        return TextEmbeds(*tensors, truncated)

    def _comm_device(self) -> torch.device | None:
        # NCCL sends the pickled header through a CUDA tensor; gloo through a CPU one.
        return self.device if self.device.type == "cuda" else None

    def release(self) -> None:
        if self.encoder is not None:
            self.encoder.release()
            self.encoder = None


def share_expansion(dims: ParallelDims, device):
    """``share(expand) -> str``: the prompt expansion of an item runs on the item group's rank 0 (a text source, so
    it holds the Qwen2.5-VL weights) and the text is broadcast to the group, as the reference broadcasts it from
    rank 0. If the expansion fails there, every rank of the group raises instead of waiting."""
    device = torch.device(device)
    comm_device = device if device.type == "cuda" else None  # NCCL sends the pickle through a CUDA tensor

    def share(expand) -> str:
        box = [None]
        if dims.rank("item") == 0:
            try:
                box = [("ok", expand())]
            except Exception as e:
                box = [("error", f"{type(e).__name__}: {e}")]
                dist.broadcast_object_list(box, group_src=0, group=dims.group("item"), device=comm_device)
                raise
        dist.broadcast_object_list(box, group_src=0, group=dims.group("item"), device=comm_device)
        status, text = box[0]
        if status != "ok":
            raise RuntimeError(f"prompt expansion failed on the item group's rank 0: {text}")
        return text

    return share
