"""The fast path: compiled blocks equal the eager model (1 process, and 2 processes under Ulysses and ring), a second
item of the same shape compiles nothing, and the denoising loop makes no host sync (hostsync.py counts them).

Compiled against eager in fp32: inductor's CPU kernels reorder sums, so the tolerance is 1e-5 relative (rounding
only; a wrong graph is off by order 1). Compiling costs tens of seconds on a loaded CPU: the models are tiny and
each test compiles each graph once.
"""

import torch

from distributed import run_distributed
from hostsync import HostSyncs
from k5.engine.compile import compile_blocks, graphs_compiled
from k5.engine.model.config import DiTConfig
from k5.engine.model.dit import Kandinsky5DiT
from k5.engine.sampling.sampler import Conditioning, sample
from k5.kernels.nabla import NablaSpec, nabla_backend
from k5.parallel.mesh import ParallelDims
from k5.parallel.ring import _spans_with_work
from k5.parallel.sequence import apply_sequence_parallel
from numerics import rel_err

CFG = DiTConfig(in_text_dim=24, in_text_dim2=12, time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1,
                num_visual_blocks=2, axes_dims=(4, 6, 6))  # 4 heads
SPEC = NablaSpec(P=0.4, wT=1, wH=1, wW=1)  # sparse enough that NABLA differs from dense
# Dense latent 3x6x10: 45 tokens, padded to whole 64-token blocks under sequence parallelism (rank 1: padding only).
# NABLA latent 4x16x32: 4 frames x 1 x 2 tiles = 8 blocks.
DENSE, NABLA = (3, 6, 10), (4, 16, 32)
COMPILED_TOL = 1e-5

# Host syncs that are no syncs on a GPU: code that runs only when its tensors are on the CPU.
CPU_ONLY = {
    "kernels/nabla.py:_block_sparse_cpu": "the CPU gather kernel plans its steps on the host; CUDA runs FlexAttention",
    "parallel/ring.py:_spans_with_work": "skipping empty ring steps is decided on the host only for CPU tensors",
}


def build_model(nabla: bool = False):
    torch.manual_seed(0)
    model = Kandinsky5DiT(CFG).eval()
    model.visual_attention.nabla = SPEC if nabla else None
    return model


def conditioning(seed: int, masked: bool = True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True] * 4 + [False] * 2]) if masked else None
    return Conditioning(torch.randn(1, 6, 24, generator=g), mask, torch.randn(1, 12, generator=g))


def denoise(model, shape, seed, steps=2, device="cpu", on_step=None):
    """Two CFG steps of the sampler from seeded noise: the steady-state loop of every item."""
    T, H, W = shape
    noise = torch.randn(1, T, H, W, CFG.in_visual_dim, generator=torch.Generator().manual_seed(seed))
    conds = [conditioning(seed + 1), conditioning(seed + 2)]
    conds = [Conditioning(*(None if t is None else t.to(device) for t in (c.embeds, c.mask, c.pooled))) for c in conds]
    with torch.no_grad():
        return sample(lambda inp, t, c: model(inp, c.embeds, c.pooled, t, text_mask=c.mask), noise.to(device),
                      *conds, steps=steps, guidance_scale=5.0, visual_cond=CFG.visual_cond, on_step=on_step)


def test_the_counter_sees_a_host_read():
    rows = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    with HostSyncs() as syncs:
        _spans_with_work(rows, 2)
        bool(rows.any())  # the test's own read: not k5 code, not counted
    assert syncs.sites == {"parallel/ring.py:_spans_with_work": 1}


def test_no_host_sync_in_the_denoising_loop_single_device():
    """Dense attention with a text key mask, and NABLA on its CUDA kernel route (FlexAttention, run here on the
    CPU): after one warm-up item (which compiles the flex kernel), a whole item's loop reads nothing back."""
    for nabla, shape in ((False, DENSE), (True, NABLA)):
        model = build_model(nabla)
        with nabla_backend("flex"):
            denoise(model, shape, seed=1)
            with HostSyncs() as syncs:
                denoise(model, shape, seed=2)
        assert syncs.sites == {}, (nabla, dict(syncs.sites))


def test_no_host_sync_and_no_copy_in_the_denoising_loop_on_fake_cuda():
    """The same loops on fake CUDA (tests/fakecuda.py), where host-to-device copies are visible (HostSyncs cannot
    see them on the CPU): no device read anywhere in the loop, no copy from the host after the first step (which
    builds the RoPE and time tables once: fakecuda_runs.FIRST_STEP_COPIES)."""
    from fakecuda import D2H, H2D, FakeCuda
    from fakecuda_runs import FIRST_STEP_COPIES

    for nabla, shape in ((False, DENSE), (True, NABLA)):
        with FakeCuda() as fc:
            with torch.device("meta"):
                model = build_model(nabla)
            fc.module(model, torch.float32)
            with fc.watch.sampling(2) as on_step:
                out = denoise(model, shape, seed=2, device=fc.device, on_step=on_step)
        assert out.device == fc.gpu and out.dtype == torch.float32
        assert fc.watch.of(D2H, loop_only=True) == [], nabla
        assert fc.watch.of(H2D, steady=True) == [], nabla
        assert set(fc.watch.sites(H2D, loop_only=True)) <= set(FIRST_STEP_COPIES), nabla


def test_compiled_model_equals_eager_and_a_second_item_compiles_nothing():
    model = build_model()
    want = [denoise(model, DENSE, seed) for seed in (1, 11)]
    compile_blocks(model)
    first = denoise(model, DENSE, 1)
    graphs = graphs_compiled()
    second = denoise(model, DENSE, 11)  # another item of the same shape: new noise and prompts
    assert graphs_compiled() == graphs
    assert rel_err(first, want[0]) <= COMPILED_TOL and rel_err(second, want[1]) <= COMPILED_TOL
    # The item without a text mask is a variant of its own (the unmasked kernels), compiled once.
    with torch.no_grad():
        x = torch.randn(1, *DENSE, CFG.in_channels, generator=torch.Generator().manual_seed(3))
        c = conditioning(4, masked=False)
        eager = build_model()(x, c.embeds, c.pooled, torch.tensor([500.0]))
        assert rel_err(model(x, c.embeds, c.pooled, torch.tensor([500.0])), eager) <= COMPILED_TOL


def _parallel_worker(rank, world_size):
    out = {}
    for name, dims in (("ulysses", ParallelDims(ulysses=2)), ("ring", ParallelDims(ring=2))):
        dims.build_mesh("cpu")
        model = build_model()
        apply_sequence_parallel(model, dims)
        eager = [denoise(model, DENSE, seed, steps=1) for seed in (1, 11)]
        with HostSyncs() as dense_syncs:
            denoise(model, DENSE, 1, steps=1)
        model.visual_attention.nabla = SPEC  # NABLA through the ring/Ulysses path (CPU kernel)
        denoise(model, NABLA, 5, steps=1)
        with HostSyncs() as nabla_syncs:
            denoise(model, NABLA, 5, steps=1)
        model.visual_attention.nabla = None
        compile_blocks(model)
        first = denoise(model, DENSE, 1, steps=1)
        graphs = graphs_compiled()
        second = denoise(model, DENSE, 11, steps=1)
        out[name] = dict(eager=eager, compiled=[first, second], new_graphs=graphs_compiled() - graphs,
                         dense_syncs=dict(dense_syncs.sites), nabla_syncs=dict(nabla_syncs.sites))
    return out


def test_compiled_equals_eager_under_ulysses_and_ring():
    want = [denoise(build_model(), DENSE, seed, steps=1) for seed in (1, 11)]
    for res in run_distributed(_parallel_worker, 2):
        for name, r in res.items():
            for eager, compiled, ref in zip(r["eager"], r["compiled"], want):
                assert rel_err(eager, ref) <= 1e-4, name  # the layout against one process (as test_sequence)
                assert rel_err(compiled, eager) <= COMPILED_TOL, name
            assert r["new_graphs"] == 0, name
            assert r["dense_syncs"] == {}, (name, r["dense_syncs"])
            assert set(r["nabla_syncs"]) <= set(CPU_ONLY), (name, r["nabla_syncs"])


# ---- devices and the end-of-run summary ------------------------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from k5.engine.fastpath import format_summary, run_summary, setup_fast_path  # noqa: E402
from k5.launch.env import resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    out = tmp_path / "x.mp4"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), "--model", "tiny", "--prompt", "a cat",
                        "--device", "cuda", "--output", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**__import__("os").environ, "K5_TINY_CACHE": str(cache)})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: CUDA is not available"), r.stderr
    assert not out.exists() and not any(cache.iterdir())  # refused before even the tiny checkpoint was built


def test_device_rule():
    if torch.cuda.is_available():
        assert resolve_device("cuda", 0) == torch.device("cuda", 0)
    else:
        assert resolve_device(None, 3) == torch.device("cpu")
        with pytest.raises(ValueError, match="use --device cpu"):
            resolve_device("cuda:1", 1)
    assert resolve_device("cpu", 5) == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0", 0)
    with pytest.raises(ValueError, match="cpu or cuda"):
        resolve_device("meta", 0)


def test_a_gpu_index_is_for_one_process_per_machine(monkeypatch):
    """cuda:N with several ranks on this machine puts them all on GPU N (refused, whether or not CUDA is here);
    with one rank a machine (a multi-node job, one process each) it is that GPU."""
    for ranks in (2, 8):
        with pytest.raises(ValueError, match=f"puts all {ranks} ranks on this machine on GPU 3.*use --device cuda,"):
            resolve_device("cuda:3", 0, ranks_here=ranks)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_device("cuda:3", 0, ranks_here=1) == torch.device("cuda", 3)
    assert resolve_device("cuda", 5, ranks_here=8) == torch.device("cuda", 5)


def test_summary_reports_compile_and_memory():
    model = build_model()
    fast = setup_fast_path(model, torch.device("cpu"), compile=False)
    s = run_summary(fast, torch.device("cpu"))
    assert s["compile"] == {"compiled": False, "graphs": 0, "recompiles": 0}
    assert s["attention_backend"] == "cpu" and s["memory"]["peak_rss_gib"] > 0
    assert format_summary(s).startswith("not compiled, attention cpu, peak memory ")
