"""The dense attention probe (kernels/attention.py) at the run's real lengths and masks.

Its comparison runs on the CPU with real numbers; its CUDA route on fake CUDA (tests/fakecuda.py), with the kernels
it calls recorded, and with a length-dependent failure put in that the former 200-token probe did not see.
"""

from types import SimpleNamespace

import pytest
import torch

from fakecuda import FakeCuda
from k5.engine.model.config import PRESETS
from k5.kernels import attention as attn
from k5.kernels.attention import SMALL_CALL, AttentionCall, disagreement, resolve_dense_backend
from k5.parallel.mesh import ParallelDims

PRO_HD_TOKENS = 31 * 48 * 80  # 119,040: Pro 5 s at 768x1280 on one GPU


@pytest.mark.parametrize("call", [AttentionCall(300, 300, 2, lse=True), AttentionCall(300, 256, 3, masked=True),
                                  AttentionCall(150, 97, 2, masked=True, lse=True)], ids=str)
def test_the_probe_passes_a_correct_kernel_on_the_cpu(call):
    """The CPU kernels against the fp32 reference on the probe's rows: they agree (the probe's comparison, with real
    numbers)."""
    assert attn._probe("auto", "cpu", torch.float32, 64, call) is None


def test_disagreement_catches_wrong_output_wrong_lse_and_nan():
    g = torch.Generator().manual_seed(0)
    out, lse = torch.randn(1, 128, 2, 64, generator=g), torch.randn(1, 2, 128, generator=g)
    assert disagreement(out, lse, out.clone(), lse.clone()) is None
    assert disagreement(out * 1.05, lse, out, lse).startswith("disagrees with the math kernel (relative error 5.0e-02")
    assert "lse 1.0e-01" in disagreement(out, lse + 0.1, out, lse)
    assert disagreement(out, None, out, None) is None  # attention(): no lse to compare
    nan = out.clone()
    nan[0, 3, 1, 7] = float("nan")
    assert disagreement(nan, lse, out, lse) is not None


def test_the_probe_rows_take_both_ends_of_a_long_sequence():
    rows = attn.probe_rows(PRO_HD_TOKENS, "cpu")
    assert rows.tolist() == list(range(64)) + list(range(PRO_HD_TOKENS - 64, PRO_HD_TOKENS))
    assert attn.probe_rows(100, "cpu").tolist() == list(range(100))


def probed(monkeypatch, calls, fail_above: int | None = None, name="auto"):
    """resolve_dense_backend on fake CUDA (sm90), recording each (backend, q_len, kv_len, masked) the CUDA kernels
    get; ``fail_above``: cuDNN raises beyond that many queries, as a kernel that breaks only at long lengths."""
    seen = []
    real = attn._dense_cuda

    def spy(q, k, v, key_mask):
        seen.append((attn.dense_backend(), q.shape[2], k.shape[2], key_mask is not None))
        if fail_above is not None and attn.dense_backend() == "cudnn" and q.shape[2] > fail_above:
            raise RuntimeError("cuDNN Frontend error: no valid execution plan")
        return real(q, k, v, key_mask)

    monkeypatch.setattr(attn, "_dense_cuda", spy)
    with FakeCuda() as fc:
        fc.watch.answers["kernels/attention.py:disagreement"] = True  # the verdict read: agrees
        try:
            return resolve_dense_backend(name, fc.device, torch.bfloat16, 128, calls), seen
        finally:
            attn.set_dense_backend("auto")


def test_the_probe_runs_the_calls_at_their_real_lengths(monkeypatch):
    calls = [AttentionCall(PRO_HD_TOKENS, PRO_HD_TOKENS, 32), AttentionCall(PRO_HD_TOKENS, 256, 32, masked=True)]
    backend, seen = probed(monkeypatch, calls)
    assert backend == "cudnn"
    # The masked call first (its kernel is the same whatever the backend; in attention() torch picks it), then
    # cuDNN on the small call and the real unmasked one.
    assert seen == [("cudnn", 200, 200, False), ("cudnn", PRO_HD_TOKENS, PRO_HD_TOKENS, False)]


def test_a_kernel_that_fails_only_at_the_real_length_is_caught(monkeypatch):
    long = AttentionCall(PRO_HD_TOKENS, PRO_HD_TOKENS, 32)
    assert probed(monkeypatch, [], fail_above=200)[0] == "cudnn"  # the 200-token probe alone: cuDNN chosen
    backend, seen = probed(monkeypatch, [long], fail_above=200)
    assert backend == "flash" and ("flash", PRO_HD_TOKENS, PRO_HD_TOKENS, False) in seen
    with pytest.raises(ValueError, match=r"attention backend cudnn does not run on cuda:0 .*cudnn: 119040 queries x "
                                         r"119040 keys x 32 heads without a mask: RuntimeError: cuDNN Frontend"):
        probed(monkeypatch, [long], fail_above=200, name="cudnn")


def test_a_failing_masked_call_is_refused_at_setup(monkeypatch):
    def failing(q, k, v, key_mask=None):
        raise RuntimeError("invalid configuration argument")

    monkeypatch.setattr(attn, "attention", failing)
    with pytest.raises(ValueError, match=r"attention of 119040 queries x 256 keys x 32 heads with a key mask \(the "
                                         r"masked kernels, whatever --attention-backend\) fails"):
        probed(monkeypatch, [AttentionCall(PRO_HD_TOKENS, 256, 32, masked=True)])


def test_the_launchers_calls_for_a_layout():
    """launch/engine.attention_calls for Pro 5 s SD on ring 2 x ulysses 4 (dense): 47,616 tokens in 744 blocks,
    93 per rank (5,952 tokens), a ring chunk of 4 ranks' shards (23,808) with 32 / 4 heads, no padding."""
    from k5.launch.engine import attention_calls

    cfg = PRESETS["pro"]
    rt = SimpleNamespace(pipe=SimpleNamespace(dit=SimpleNamespace(config=cfg, nabla=None)),
                         dims=ParallelDims(ring=2, ulysses=4), image=False)
    calls = attention_calls(rt, {(121, 512, 768)})
    assert calls == [AttentionCall(256, 256, 32, False), AttentionCall(5952, 256, 32, False),
                     AttentionCall(256, 256, 32, True), AttentionCall(5952, 256, 32, True),
                     AttentionCall(23808, 23808, 8, False, lse=True)]
    one_gpu = attention_calls(SimpleNamespace(pipe=rt.pipe, dims=ParallelDims(), image=False), {(121, 768, 1280)})
    assert one_gpu[-1] == AttentionCall(PRO_HD_TOKENS, PRO_HD_TOKENS, 32)
    assert SMALL_CALL not in calls
