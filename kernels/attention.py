"""Dense attention on BSHD tensors.

``attention`` is the hot path of the DiT (output only). ``dense_attention`` also returns the log-sum-exp that the
ring / chunked paths need to merge partial results (see merge.py).

Conventions: q [B, Sq, H, D], k/v [B, Sk, H, D], key_mask bool [B, Sk] (True = attend), lse fp32 [B, H, Sq]
(natural log of the sum over keys of exp(q.k / sqrt(D))). A query that sees no key gets out = 0, lse = -inf, so a
later merge treats it as an empty chunk.

The CUDA kernel of the unmasked calls (the visual self-attention, dense or one ring chunk) is a process-wide choice,
``set_dense_backend`` (the CLI's --attention-backend): cuDNN's fused attention, flash, memory-efficient, or a
reference-quality fp32 softmax ("math"); "auto" left unresolved is F.scaled_dot_product_attention's own pick (and
flash where the lse is needed). Every one of them returns the log-sum-exp, so the ring can merge its chunks
whichever is chosen. ``resolve_dense_backend`` turns "auto" into the fastest exact
kernel of the device: cuDNN on Hopper and newer when it runs and agrees with the math kernel, else flash. Masked
calls (text cross-attention, padded ring chunks) always take the memory-efficient kernel, which takes a bias.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DENSE_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
_dense_backend = "auto"


def set_dense_backend(name: str) -> None:
    """Choose the CUDA kernel of unmasked dense attention for this process (see the module docstring)."""
    global _dense_backend
    if name not in DENSE_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(DENSE_BACKENDS)}")
    _dense_backend = name


def dense_backend() -> str:
    return _dense_backend


@dataclass(frozen=True)
class AttentionCall:
    """A dense attention call of a run, as the probe repeats it: ``q_len`` queries over ``kv_len`` keys, ``heads``
    heads, with a key mask (the text's, a padded ring chunk's) or without, through ``attention`` (the DiT's calls)
    or, with ``lse``, ``dense_attention`` (a ring chunk's)."""

    q_len: int
    kv_len: int
    heads: int
    masked: bool = False
    lse: bool = False

    def __str__(self) -> str:
        mask = "with a key mask" if self.masked else "without a mask"
        return f"{self.q_len} queries x {self.kv_len} keys x {self.heads} heads {mask}{' (with lse)' * self.lse}"


# The probe's own small call, always run first; the run's calls come from the launcher (engine.fastpath).
SMALL_CALL = AttentionCall(200, 200, 2, lse=True)
PROBE_HEADS = 2  # at most: the run's lengths matter; more heads would only cost memory next to the weights
PROBE_ROWS = 64  # query rows at each end of the sequence compared with the fp32 reference


def resolve_dense_backend(name: str, device, dtype: torch.dtype, head_dim: int, calls=()) -> str:
    """The concrete backend ``name`` stands for on ``device``: "auto" becomes cuDNN on sm90+ in half precision
    when a probe runs it and it agrees with the math kernel (bf16 tolerance), else flash; on the CPU every choice
    is the fused CPU kernel ("cpu"). A named backend is probed too, so an unusable choice fails here, at setup.

    ``calls``: the run's attention calls (``AttentionCall``), probed at their real lengths besides a small one,
    because a kernel may fail or go wrong only at a length (S around 119k for Pro HD) a small probe never reaches.
    Calls with a key mask take the same kernels whatever the backend (memory-efficient, or torch's own choice in
    ``attention``): one of those that fails raises ValueError, since no choice of backend avoids it."""
    device = torch.device(device)
    if name not in DENSE_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(DENSE_BACKENDS)}")
    if device.type != "cuda":
        return "cpu"
    calls = sorted(set(calls), key=lambda c: (c.masked, c.q_len, c.kv_len, c.heads))
    for call in (c for c in calls if c.masked):
        err = _probe("auto", device, dtype, head_dim, call)
        if err is not None:
            raise ValueError(f"attention of {call} (the masked kernels, whatever --attention-backend) fails on "
                             f"{device} for {dtype} head dim {head_dim}: {err}")
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        candidates = (["cudnn"] if torch.cuda.get_device_capability(device) >= (9, 0) else []) + ["flash"]
        candidates = candidates if half else ["efficient"]
    else:
        candidates = [name]
    errors = []
    for cand in candidates:
        probe_dtype = dtype if half or cand in ("efficient", "math") else torch.bfloat16
        err = next((f"{call}: {e}" for call in [SMALL_CALL, *(c for c in calls if not c.masked)]
                    if (e := _probe(cand, device, probe_dtype, head_dim, call)) is not None), None)
        if err is None:
            return cand
        errors.append(f"{cand}: {err}")
    if name == "auto":
        return "math"
    raise ValueError(f"attention backend {name} does not run on {device} for {dtype} head dim {head_dim}: "
                     f"{'; '.join(errors)}; use --attention-backend auto")


def probe_inputs(call: AttentionCall, device, dtype, head_dim: int):
    """Seeded q, k, v [1, S, H, D] of ``call`` (at most PROBE_HEADS heads) and its key mask: the last quarter of
    the keys masked, as a short prompt or a padded chunk leaves them (None without a mask)."""
    g = torch.Generator(device=device).manual_seed(0)
    heads = min(call.heads, PROBE_HEADS)
    q = torch.randn(1, call.q_len, heads, head_dim, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(1, call.kv_len, heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(2))
    mask = None
    if call.masked:
        mask = torch.arange(call.kv_len, device=device)[None] < max(1, call.kv_len - call.kv_len // 4)
    return q, k, v, mask


def probe_rows(q_len: int, device) -> torch.Tensor:
    """The query rows the probe checks: PROBE_ROWS at each end (every row of a short call)."""
    if q_len <= 2 * PROBE_ROWS:
        return torch.arange(q_len, device=device)
    return torch.cat([torch.arange(PROBE_ROWS, device=device), torch.arange(q_len - PROBE_ROWS, q_len, device=device)])


def disagreement(out, lse, ref_out, ref_lse) -> str | None:
    """None when out [B,S,H,D] (and lse [B,H,S] unless None) match the reference within bf16 tolerance, else what
    differs. One host read when they match (the verdict), more only to word a failure."""
    err = (out.double() - ref_out.double()).norm() / ref_out.double().norm()
    lse_err = torch.zeros((), device=out.device) if lse is None else (lse.double() - ref_lse.double()).abs().max()
    if bool(torch.isfinite(out).all() & (err <= 2e-2) & (lse_err <= 1e-2)):
        return None
    return f"disagrees with the math kernel (relative error {float(err):.1e}, lse {float(lse_err):.1e})"


def _probe(name: str, device, dtype, head_dim: int, call: AttentionCall = SMALL_CALL) -> str | None:
    """None if ``name`` runs ``call`` with an lse that matches the fp32 reference on the rows of probe_rows, else
    why not."""
    old = _dense_backend
    try:
        set_dense_backend(name)
        q, k, v, mask = probe_inputs(call, device, dtype, head_dim)
        out, lse = dense_attention(q, k, v, key_mask=mask) if call.lse else (attention(q, k, v, key_mask=mask), None)
        rows = probe_rows(call.q_len, q.device)
        ref_out, ref_lse = _dense_explicit(q[:, rows].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return disagreement(out[:, rows], None if lse is None else lse[:, :, rows], ref_out.transpose(1, 2), ref_lse)
    except Exception as e:  # noqa: BLE001 - a backend this build or device lacks: try the next
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        set_dense_backend(old)


# Query rows per step of the explicit fallback: bounds the [B, H, chunk, Sk] fp32 score buffer.
_FALLBACK_Q_CHUNK = 1024
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_shapes(q, k, v, key_mask):
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention expects q [B,Sq,H,D] and k, v [B,Sk,H,D] with equal B, H, D; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != k.shape[:2]):
        raise ValueError(
            f"key_mask must be bool [B, Sk] = {tuple(k.shape[:2])} (True = attend); "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
        )


def attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(D)) v, BSHD in and out, output in q.dtype.

    Without a mask no attn_mask is passed, so SDPA is free to pick its fastest (flash) kernel.
    """
    _check_shapes(q, k, v, key_mask)
    if key_mask is None and q.is_cuda and _dense_backend != "auto":
        return dense_attention(q, k, v)[0]
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    )
    if key_mask is not None:
        # A batch row whose keys are all masked is 0, not NaN (as in dense_attention); the check is O(B*Sk).
        out = out.masked_fill(~key_mask.any(-1)[:, None, None, None], 0.0)
    return out.transpose(1, 2).to(q.dtype)


def _additive_bias(key_mask, dtype, pad_to=1):
    """[B,1,1,Sk] additive bias (0 / -inf) of ``dtype``; storage optionally padded so its rows stay aligned."""
    B, Sk = key_mask.shape
    Sk_pad = -(-Sk // pad_to) * pad_to
    bias = torch.zeros(B, 1, 1, Sk_pad, dtype=dtype, device=key_mask.device)
    bias[..., :Sk].masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return bias[..., :Sk]


def _dense_explicit(q, k, v, key_mask):
    """Reference-quality fallback on BHSD tensors: fp32 (fp64 for fp64 inputs) softmax, chunked over queries."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5
    kt, vf = k.to(ct).transpose(-1, -2), v.to(ct)
    bias = None if key_mask is None else _additive_bias(key_mask, ct)
    outs, lses = [], []
    for s in range(0, q.shape[2], _FALLBACK_Q_CHUNK):
        scores = (q[:, :, s : s + _FALLBACK_Q_CHUNK].to(ct) @ kt) * scale
        if bias is not None:
            scores = scores + bias
        lse = scores.logsumexp(-1)
        # exp(-inf - 0) = 0 keeps fully masked rows at 0 instead of exp(-inf + inf) = NaN.
        p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append(p @ vf)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _dense_cuda(q, k, v, key_mask):
    """CUDA kernels that return the lse (BHSD in). Not exercised by the CPU test-suite."""
    scale = q.shape[-1] ** -0.5
    half = q.dtype in (torch.float16, torch.bfloat16)
    if key_mask is None and half and _dense_backend == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
        lse = lse.reshape(q.shape[:3])  # [B, H, Sq, 1] in some torch versions
    elif key_mask is None and half and _dense_backend in ("auto", "flash"):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    elif key_mask is None and _dense_backend == "math":
        out, lse = _dense_explicit(q, k, v, None)
    else:
        # Memory-efficient kernel: takes fp32 and an additive bias. Its bias rows must be 16-element aligned
        # (hence the padded storage) and its lse is padded along Sq to a multiple of 32 (hence the slice).
        bias = None
        if key_mask is not None:
            bias = _additive_bias(key_mask, q.dtype, pad_to=16).expand(-1, q.shape[1], q.shape[2], -1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)[:2]
        lse = lse[:, :, : q.shape[2]]
    return out, lse


def dense_attention(q, k, v, key_mask=None):
    """Dense attention returning (out [B,Sq,H,D] in q.dtype, lse fp32 [B,H,Sq])."""
    _check_shapes(q, k, v, key_mask)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda:
        out, lse = _dense_cuda(qh.contiguous(), kh.contiguous(), vh.contiguous(), key_mask)
    elif q.device.type == "cpu" and q.dtype in _CPU_KERNEL_DTYPES:
        # The CPU flash kernel returns the lse; it takes only an additive mask of the query's dtype.
        bias = None if key_mask is None else _additive_bias(key_mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, attn_mask=bias)
    else:
        out, lse = _dense_explicit(qh, kh, vh, key_mask)
    lse = lse.float()
    if key_mask is not None:
        # Kernels disagree on rows with no visible key (the CPU kernel returns lse = 0); pin them to (0, -inf).
        empty = ~key_mask.any(-1)[:, None, None]
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out.transpose(1, 2).to(q.dtype), lse
