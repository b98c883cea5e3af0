"""Ring attention over the ring process group (BSHD), dense or NABLA block-sparse.

Each ring rank g holds the queries and keys/values of one contiguous span g of the sequence. K and V
travel one hop per step (rank r sends to r+1, receives from r-1), packed in one buffer; the transfer of
the next chunk is issued before computing on the current one and waited after, so P2P overlaps compute.
At step t rank g holds span (g - t) mod R. Partial results merge in fp32 through their lse
(k5.kernels.merge).

NABLA needs, for its local query blocks, the block-attention estimate over ALL key blocks (softmax and
top-CDF run over the whole row), so the pooled keys (S/64 x D per head: small) are all-gathered once;
the mask rows of the local query blocks are computed locally, and step t uses the column range of span
(g - t) mod R. On the CPU a step whose sub-mask is empty for every (batch, head) does not call the kernel at all;
on a GPU finding that out would stall the launch queue every layer, so every step runs (an empty tile row costs the
FlexAttention kernel next to nothing).

No host sync on the hot path: padding is described by host ints (from the layout) plus a device mask built once by
the caller, never read back from the device.

Under torch.compile (a regionally compiled DiT block) the ring loop itself runs eagerly: its P2P calls break the
graph anyway, and a graph break inside a loop makes dynamo skip the whole frame. What each step computes is
compiled on its own, and the step index is none of its inputs: the callers decide per span, on the host, whether a
step is skipped, masked or plain, and hand the loop a function and its tensors. A Python int argument would become
a guard (src == 0, src == 1, ...): one recompile per ring step, and past dynamo's recompile limit eager steps. So a
ring of any degree compiles its step once per shape and kind (plain, key-masked; NABLA: one).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.distributed as dist

from k5.kernels.attention import dense_attention
from k5.kernels.merge import merge_attention
from k5.kernels.nabla import block_sparse_attention, nabla_block_mask, pool_blocks
from k5.parallel.comm_stats import CommStats, register_counter, tally


@dataclass(frozen=True)
class Padding:
    """Real positions of a padded ring sequence (R spans of L): the first ``valid`` ones, since padding is always
    at the end (layout.py). ``valid`` is a host int, so which spans are full, partial or all padding is known
    without reading the device; ``mask`` (bool [R*L] on the compute device) is built once per layout by the
    caller, not copied from the host every layer."""

    valid: int
    mask: torch.Tensor


@dataclass
class RingCounters:
    """Attention kernel calls and ring steps skipped because their key chunk had nothing to attend."""

    kernel_calls: int = 0
    skipped_steps: int = 0

    def __post_init__(self):
        self.key = register_counter(self)

    def count(self, skipped: bool) -> None:
        # Through the k5::tally op, which ends no compiled graph (see comm_stats.py).
        tally(self.key, "skipped_steps" if skipped else "kernel_calls", 1)

    def _count(self, kind: str, amount: int) -> None:
        setattr(self, kind, getattr(self, kind) + amount)


class RingComm:
    """One P2P exchange per step: send a buffer to the next ring rank, receive one from the previous."""

    def __init__(self, group, stats: CommStats | None = None):
        self.group, self.stats = group, stats
        n, r = dist.get_world_size(group), dist.get_rank(group)
        self.send_to = dist.get_global_rank(group, (r + 1) % n)
        self.recv_from = dist.get_global_rank(group, (r - 1) % n)
        self._reqs = []

    def send_recv(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Start sending ``send`` and receiving into ``recv``; both must stay untouched until wait()."""
        ops = [
            dist.P2POp(dist.isend, send, self.send_to, self.group),
            dist.P2POp(dist.irecv, recv, self.recv_from, self.group),
        ]
        self._reqs = dist.batch_isend_irecv(ops)
        if self.stats is not None:
            self.stats.p2p_ring(send)

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []


def _run_steps(q, k, v, group, steps: list, stats, counters):
    """The ring's steps: inline when the ring is one rank (Ulysses alone: nothing rotates, and a compiled block stays
    one graph), else through the eager loop."""
    if dist.get_world_size(group) > 1:
        return _ring_loop(q, k, v, group, steps, stats, counters)
    if len(steps) != 1:
        raise ValueError(f"the ring of 1 rank needs one step; got {len(steps)}")
    counters.count(skipped=steps[0] is None)
    if steps[0] is None:
        B, S, H, _ = q.shape
        return q.new_zeros(q.shape, dtype=torch.float32), torch.full((B, H, S), float("-inf"), device=q.device)
    fn, *extra = steps[0]
    out, lse = fn(q, k, v, *extra)
    return out.float(), lse


@torch.compiler.disable(recursive=False)
def _ring_loop(q, k, v, group, steps: list, stats, counters):
    """Rotate K/V around the ring; ``steps[src]`` is what to do with span src's keys: None (nothing to attend), or
    (fn, *tensors), and the step computes fn(q, k_src, v_src, *tensors) -> (out, lse).

    Eager even inside a compiled block (recursive=False: the step functions it calls are still compiled, see the
    module docstring). Their extra tensors are made contiguous here, so every step hands its compiled function
    inputs of the same strides."""
    R, g = dist.get_world_size(group), dist.get_rank(group)
    if len(steps) != R:
        raise ValueError(f"the ring of {R} ranks needs one step per span; got {len(steps)}")
    # Double buffer: step t computes on bufs[t % 2] while the next chunk arrives in the other one, which
    # step t-1 finished sending and computing on before its wait() returned.
    bufs = [torch.stack((k, v))]
    comm = None
    if R > 1:
        comm = RingComm(group, stats)
        bufs.append(torch.empty_like(bufs[0]))
    out = lse = None
    for t in range(R):
        kv = bufs[t % 2]
        if t + 1 < R:
            comm.send_recv(kv, bufs[(t + 1) % 2])
        step = steps[(g - t) % R]
        counters.count(skipped=step is None)
        if step is not None:
            fn, *extra = step
            block = fn(q, kv[0], kv[1], *(x.contiguous() for x in extra))
            # The kernels' lse layouts differ (masked or not): a contiguous one keeps the merge at one variant.
            block = block[0], block[1].contiguous()
            out, lse = (block[0].float(), block[1]) if out is None else merge_attention(out, lse, *block)
        if t + 1 < R:
            comm.wait()
    if out is None:  # nothing visible anywhere (e.g. only pad queries): the empty result of the kernels
        B, S, H, _ = q.shape
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = torch.full((B, H, S), float("-inf"), device=q.device)
    return out, lse


def ring_dense_attention(q, k, v, group, padding: Padding | None = None, stats=None, counters=None):
    """Dense attention of this span's queries over all spans' keys; returns fp32 (out [B,L,h,D], lse [B,h,L]).

    q, k, v: [B, L, h, D], span g = this rank's ring rank. ``padding``: the real keys of the padded sequence
    (None: no padding); pad keys are masked and an all-pad span is skipped.
    """
    counters = counters if counters is not None else RingCounters()
    B, L = k.shape[:2]
    R = dist.get_world_size(group)
    spans = None  # bound before the closure below reads it (dynamo refuses an unset cell)
    if padding is not None:
        if tuple(padding.mask.shape) != (R * L,) or not 0 <= padding.valid <= R * L:
            raise ValueError(f"padding must describe the padded sequence of ring * span = {R * L} positions; got "
                             f"{padding.valid} real of a mask {tuple(padding.mask.shape)}")
        spans = padding.mask.view(R, L)

    def step(src):
        if padding is None or (src + 1) * L <= padding.valid:
            return (dense_attention,)
        if src * L >= padding.valid:  # all padding: nothing to attend
            return None
        return dense_attention, spans[src].expand(B, L)

    return _run_steps(q, k, v, group, [step(src) for src in range(R)], stats, counters)


def _spans_with_work(rows, R: int) -> list[bool]:
    """Which key spans hold a selected block for any (batch, head, query block) of ``rows``. A host read: called
    on the CPU only, where it costs no device sync and saves the kernel calls of empty steps."""
    B, h, nbl = rows.shape[:3]
    return rows.reshape(B, h, nbl, R, -1).any(-1).any(2).any(1).any(0).tolist()


def gather_pooled_keys(k_pooled, group, stats=None):
    """[B, h, nb_local, D] -> [B, h, R*nb_local, D], spans in ring order."""
    R = dist.get_world_size(group)
    if R == 1:
        return k_pooled
    parts = [torch.empty_like(k_pooled) for _ in range(R)]
    dist.all_gather(parts, k_pooled.contiguous(), group=group)
    if stats is not None:
        stats.all_gather(k_pooled, R)
    return torch.cat(parts, dim=2)


def ring_nabla_attention(q, k, v, group, P, sta_rows, k_valid: int | None = None, q_valid=None, stats=None,
                         counters=None):
    """NABLA attention of this span's queries over the ring; returns (out fp32, lse, mask_rows).

    q, k, v: [B, L, h, D] (fractal token order, L a multiple of 64). ``sta_rows``: bool [L/64, R*L/64],
    the STA prior rows of this span's query blocks over all (padded) key blocks. ``k_valid``: the number of
    real key blocks, which come first (the pad blocks after them are never selected); ``q_valid``: bool [L/64]
    on the device (False = pad query block, its row is emptied). ``mask_rows``: bool [B, h, L/64, R*L/64], this
    span's rows of the NABLA block mask.
    """
    counters = counters if counters is not None else RingCounters()
    R = dist.get_world_size(group)
    B, L, h, _ = q.shape
    nbl = L // 64
    k_all = gather_pooled_keys(pool_blocks(k), group, stats)
    rows = nabla_block_mask(pool_blocks(q), k_all, sta_rows, P, k_valid=k_valid)
    if q_valid is not None:
        rows = rows & q_valid.to(rows.device)[:, None]
    nonempty = _spans_with_work(rows, R) if rows.device.type == "cpu" else None

    steps = [None if nonempty is not None and not nonempty[src] else
             (block_sparse_attention, rows[..., src * nbl : (src + 1) * nbl]) for src in range(R)]
    out, lse = _run_steps(q, k, v, group, steps, stats, counters)
    return out, lse, rows

