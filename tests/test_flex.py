"""NABLA's FlexAttention route (the CUDA kernel), run on the CPU through compiled flex with partial blocks.

The BlockMask conversion is checked against an independent fp64 attention with the tile mask expanded to tokens,
over more distinct shapes than dynamo's recompile limit in one process (the limit is lowered to keep it cheap): a
silent fallback to eager flex would compute dense attention (wrong by far more than the tolerance, shown below).
"""

import contextlib

import pytest
import torch
import torch._dynamo
import torch._dynamo.config as dynamo_config

from k5.kernels import flex
from k5.kernels.attention import resolve_dense_backend, set_dense_backend
from k5.kernels.nabla import block_sparse_attention, nabla_backend
from numerics import reference_attention, rel_err

FP32_TOL = 1e-5  # compiled fp32 kernel vs the fp64 reference: rounding only
LIMIT = 2  # the recompile limit inside these tests (dynamo's default is 8)


def _case(B, H, nq, nk, D, seed, density=0.4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nq * 64, H, D, generator=g)
    k, v = (torch.randn(B, nk * 64, H, D, generator=g) for _ in range(2))
    mask = torch.rand(B, H, nq, nk, generator=g) < density
    mask[0, 0, 0] = False  # an empty tile row: its queries see nothing
    mask[-1, -1, -1] = True  # a full tile row
    return q, k, v, mask


def _decode(num, idx, nk):
    """kv_num_blocks / kv_indices -> bool [B, H, nq, nk] (the first num indices of a row are its tiles)."""
    sel = torch.arange(idx.shape[-1]) < num[..., None]
    return torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool).scatter_(-1, idx.long(), sel)


def test_block_mask_holds_the_tiles_and_no_backward_metadata():
    _, _, _, mask = _case(2, 3, 4, 5, 8, seed=1)
    full = flex.block_mask_from_tiles(mask, 4 * 64, 5 * 64)
    assert torch.equal(_decode(full.full_kv_num_blocks, full.full_kv_indices, 5), mask)
    assert not full.kv_num_blocks.any()  # CUDA route: every selected tile is a full block, no mask_mod inside
    part = flex.block_mask_from_tiles(mask, 4 * 64, 5 * 64, partial=True)
    assert torch.equal(_decode(part.kv_num_blocks, part.kv_indices, 5), mask) and part.full_kv_num_blocks is None
    for bm in (full, part):
        assert bm.q_num_blocks is None and bm.q_indices is None  # only a backward pass would read these
        assert bm.BLOCK_SIZE == (64, 64) and bm.seq_lengths == (4 * 64, 5 * 64)
    # The kernel's tiles divide the 64-token NABLA blocks (inductor's sm90 defaults of 128 would not): see the
    # kernel options tests below.


def test_compiled_flex_matches_masked_reference_past_the_recompile_limit():
    torch._dynamo.reset()
    shapes = [(3, 3), (4, 4), (2, 5), (5, 2), (6, 3)]  # more distinct shapes than LIMIT
    assert len(shapes) > LIMIT
    with dynamo_config.patch(recompile_limit=LIMIT), nabla_backend("flex"):
        for i, (nq, nk) in enumerate(shapes):
            q, k, v, mask = _case(1, 2, nq, nk, 16, seed=10 + i)
            out, lse = block_sparse_attention(q, k, v, mask, return_lse=False)
            ref, _ = reference_attention(q, k, v, block_mask=mask)
            assert lse is None and out.dtype == torch.float32
            assert rel_err(out, ref) < FP32_TOL, (nq, nk)
            assert (out[0, :64, 0] == 0).all()  # the empty tile row: out = 0, as the other kernels give
    # One static kernel for the first shape, one dynamic-shape kernel reused by every later one.
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(flex.compiled_flex()._torchdynamo_orig_callable)
    assert len(entries) <= LIMIT

    # The failure this guards against is detectable: eager flex on the same BlockMask computes dense attention.
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, mask = _case(1, 2, 3, 3, 16, seed=10)
    eager = flex_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                           block_mask=flex.block_mask_from_tiles(mask, 192, 192, partial=True)).transpose(1, 2)
    assert rel_err(eager, reference_attention(q, k, v, block_mask=mask)[0]) > 0.1


def test_recompile_limit_hit_raises_instead_of_running_eager():
    q, k, v, mask = _case(1, 2, 2, 2, 16, seed=20)
    with nabla_backend("flex"):
        block_sparse_attention(q, k, v, mask, return_lse=False)  # compiled (or reused) for fp32
        code = flex.compiled_flex()._torchdynamo_orig_callable
        entries = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))
        # No room for one more variant: bf16 needs a new kernel, which must be an error, not eager flex.
        with dynamo_config.patch(recompile_limit=entries), pytest.raises(Exception, match="recompile"):
            block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, return_lse=False)


def test_cpu_flex_refuses_the_lse_it_cannot_give():
    q, k, v, mask = _case(1, 1, 2, 2, 8, seed=30)
    with nabla_backend("flex"), pytest.raises(ValueError, match="log-sum-exp"):
        block_sparse_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="not one of"):
        nabla_backend("triton").__enter__()


def test_dense_backend_names():
    assert resolve_dense_backend("auto", "cpu", torch.bfloat16, 64) == "cpu"
    with pytest.raises(ValueError, match="cudnn, flash"):
        set_dense_backend("fastest")


# ---- the tile indices: no second sort (issue 19) ------------------------------------------------------------------


def _argsort_tile_indices(mask):
    """The tile indices as k5 built them before issue 19: a stable descending argsort of the 0/1 mask (selected
    tiles first; within each group, ties broken by ascending key index)."""
    return torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)


def _old_block_mask_from_tiles(mask, q_len, kv_len, partial=False):
    """block_mask_from_tiles before issue 19, written out."""
    from torch.nn.attention.flex_attention import BlockMask

    num = mask.sum(-1, dtype=torch.int32)
    idx = _argsort_tile_indices(mask)
    if partial:
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=64, mask_mod=flex._keep_all, seq_lengths=(q_len, kv_len),
                                        compute_q_blocks=False)
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=64, mask_mod=None,
                                    seq_lengths=(q_len, kv_len), compute_q_blocks=False)


def test_tile_indices_are_the_argsort_they_replace():
    """kv_tiles against the stable argsort it replaces, bitwise, on random masks of every density: rows with no
    selected tile, with every tile, and everything between (every selected tile ties with every other, and so does
    every unselected one: the order within a group is the tie rule)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 7, 13), (1, 2, 5, 300), (1, 1, 1, 1), (4, 64)):
        for density in (0.0, 0.03, 0.5, 0.97, 1.0):
            mask = torch.rand(shape, generator=g) < density
            num, idx = flex.kv_tiles(mask)
            assert num.dtype == idx.dtype == torch.int32
            assert torch.equal(idx, _argsort_tile_indices(mask)), (shape, density)
            assert torch.equal(num, mask.sum(-1, dtype=torch.int32)), (shape, density)


def test_nabla_block_masks_are_bitwise_the_old_ones_with_ties():
    """The whole build (nabla_mask, then the BlockMask of both routes) against the old conversion written out above,
    on q, k whose tiles repeat: equal pooled keys give exactly tied scores, so the top-CDF sort meets ties too (its
    rule is unchanged: a stable ascending sort, the lower key index dropped first; the reference's
    nablaT_v2 sorts without stable=True, so its choice among tied tiles is the sort implementation's).

    By hand, four equal scores (p = 0.25 each, cdf 0.25, 0.5, 0.75, 1) at P = 0.5 keep cdf >= 0.5: tiles 1, 2, 3,
    and tile 0 (first in the stable order) is the one dropped."""
    from k5.kernels.nabla import NablaSpec, nabla_block_mask, nabla_mask

    none = torch.zeros(1, 4, dtype=torch.bool)
    tied = nabla_block_mask(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 4, 1), none, 0.5)
    assert tied.view(4).tolist() == [False, True, True, True]

    g = torch.Generator().manual_seed(3)
    T, Hb, Wb, H, D = 3, 2, 2, 2, 16
    nb = T * Hb * Wb
    base = torch.randint(-2, 3, (1, 4, 1, H, D), generator=g).float()  # 4 distinct tiles, integers: exact sums
    tiles = base[:, torch.arange(nb) % 4]  # each repeated 3 times
    q = (tiles + 0.5).expand(1, nb, 64, H, D).reshape(1, nb * 64, H, D)
    k = tiles.expand(1, nb, 64, H, D).reshape(1, nb * 64, H, D)
    for P in (0.3, 0.5, 0.8):
        mask = nabla_mask(q, k, NablaSpec(P=P, wT=1, wH=1, wW=1), T, Hb, Wb)
        assert mask.any() and not mask.all(), P
        for partial in (False, True):
            new = flex.block_mask_from_tiles(mask, nb * 64, nb * 64, partial=partial)
            old = _old_block_mask_from_tiles(mask, nb * 64, nb * 64, partial=partial)
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
                a, b = getattr(new, name), getattr(old, name)
                assert (a is None and b is None) or torch.equal(a, b), (P, partial, name)


# ---- compiled or refused: dynamo switched off (issue 19) ------------------------------------------------------------


@pytest.mark.parametrize("how", ["TORCHDYNAMO_DISABLE", "force_eager"])
def test_nabla_over_flex_is_refused_when_compiled_code_would_run_eagerly(how, monkeypatch):
    """With dynamo switched off (the variable, read when torch.compile wraps a function) or the stance
    force_eager, compiled flex runs eagerly, and eager flex ignores the block mask. Each call refuses, naming the
    cause; with the refusal taken out, the same call computes dense attention, far from the block-sparse reference
    (fp64 attention with the tile mask expanded to tokens; the gather kernel agrees with it to 1e-5)."""
    q, k, v, mask = _case(1, 2, 3, 3, 16, seed=10)
    ref, _ = reference_attention(q, k, v, block_mask=mask)
    assert rel_err(block_sparse_attention(q, k, v, mask, return_lse=False)[0], ref) < FP32_TOL  # gather kernel
    monkeypatch.setattr(flex, "_compiled", None)  # torch.compile wraps flex anew, under the state below
    if how == "TORCHDYNAMO_DISABLE":
        monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
        state = contextlib.nullcontext()
    else:
        state = torch.compiler.set_stance("force_eager")
    with state, nabla_backend("flex"):
        with pytest.raises(RuntimeError) as e:
            block_sparse_attention(q, k, v, mask, return_lse=False)
        message = str(e.value)
        assert ("TORCHDYNAMO_DISABLE=1" if how == "TORCHDYNAMO_DISABLE" else '"force_eager"') in message, message
        assert "ignores the block mask" in message and "gather" in message and "--attention dense" in message
        monkeypatch.setattr(flex, "eager_reason", lambda: None)  # what the refusal prevents:
        wrong = block_sparse_attention(q, k, v, mask, return_lse=False)[0]
    assert rel_err(wrong, ref) > 0.1
    monkeypatch.undo()
    with nabla_backend("flex"):  # and with dynamo on again, the compiled kernel is right
        assert rel_err(block_sparse_attention(q, k, v, mask, return_lse=False)[0], ref) < FP32_TOL


def test_eager_reason_names_each_setting(monkeypatch):
    import torch._dynamo.config as dynamo_config

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    assert flex.eager_reason() is None
    with torch.compiler.set_stance("fail_on_recompile"):  # raises on a recompile: never eager, so allowed
        assert flex.eager_reason() is None
    for stance in ("eager_on_recompile", "eager_then_compile"):
        with torch.compiler.set_stance(stance):
            assert f'"{stance}"' in flex.eager_reason()
    with torch.compiler.set_stance("default", force_backend="eager"):
        assert "'eager'" in flex.eager_reason()
    with dynamo_config.patch(disable=True):
        assert "TORCH_COMPILE_DISABLE=1" in flex.eager_reason()
    with pytest.raises(ValueError, match="TORCHDYNAMO_DISABLE=1"):
        monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
        flex.check_compiled_flex()


def test_the_cli_refuses_nabla_on_cuda_with_dynamo_off_before_loading(tmp_path, monkeypatch, capsys, no_loading):
    """--attention nabla on CUDA runs flex: with TORCHDYNAMO_DISABLE=1 the CLI says why and exits 2 before any
    weight loads (this machine has no GPU: torch.cuda answers as one with a GPU; nothing reaches a CUDA call)."""
    from k5.launch.generate import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    out = tmp_path / "cat.mp4"
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompt", "a cat", "--attention", "nabla", "--height", "128", "--width", "128",
              "--device", "cuda", "--output", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "TORCHDYNAMO_DISABLE=1" in err and "ignores the block mask" in err, err
    assert not out.exists()


# ---- kernel options (issue 19) --------------------------------------------------------------------------------------


def _inductor_default(capability, head_dim, dtype):
    """Inductor's default forward config on a CUDA device of ``capability``, asked as its flex lowering asks
    (CUDAConfigHeuristic.get_flex_attn_fwd_configs, no max-autotune: one config)."""
    from unittest import mock

    import torch._inductor.config as inductor_config
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    with mock.patch.object(torch.cuda, "get_device_capability", lambda *a: capability), \
            inductor_config.patch(max_autotune=False):
        (conf,) = CUDAConfigHeuristic().get_flex_attn_fwd_configs(head_dim, dtype)
    return conf


def _as_lowered(options, conf):
    """The knobs the lowering compiles with: the kernel_options given, the rest from ``conf`` (the setdefault calls
    of torch/_inductor/kernel/flex/flex_attention.py, forward)."""
    out = dict(options)
    for key, value in (("num_stages", conf.num_stages), ("num_warps", conf.num_warps), ("BLOCK_M", conf.block_m),
                       ("BLOCK_N", conf.block_n)):
        out.setdefault(key, value)
    return out


@pytest.mark.parametrize("capability", [(9, 0), (10, 0)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_options_divide_the_mask_blocks_under_inductors_defaults(capability, head_dim, dtype):
    """On sm90 and sm100, Lite's head dim 64 and Pro's 128: the tiles divide the 64-token mask blocks, every knob is
    ours (nothing left to inductor's default), every key is one FlexAttention accepts, and the pipelined tiles fit
    the device's shared memory."""
    from torch.nn.attention.flex_attention import FlexKernelOptions

    conf = _inductor_default(capability, head_dim, dtype)
    ours = flex.kernel_options(head_dim, dtype, capability, "k5")
    lowered = _as_lowered(ours, conf)
    assert 64 % lowered["BLOCK_M"] == 0 and 64 % lowered["BLOCK_N"] == 0
    assert lowered == ours and set(ours) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    assert set(ours) <= set(FlexKernelOptions.__annotations__)
    assert ours["num_warps"] == 4 and flex.tiles_fit(capability, head_dim, dtype, 64, 64, ours["num_stages"])
    # The old pins (choice "default") still divide, but leave warps and stages to inductor.
    old = _as_lowered(flex.kernel_options(head_dim, dtype, capability, "default"), conf)
    assert 64 % old["BLOCK_M"] == 0 and 64 % old["BLOCK_N"] == 0
    assert (old["num_warps"], old["num_stages"]) == (conf.num_warps, conf.num_stages)


def test_inductors_defaults_are_what_the_options_correct():
    """The facts the options rest on, from torch's own tables: without pins, Lite's and Pro's bf16 defaults on sm90
    have 128-row tiles (the historical 'must be divisible by BLOCK_M' error), and Pro's (head dim 128) runs 8 warps,
    which the old 64x64 pins kept; ours run 4. fp32 head dim 128 on sm90 keeps 3 stages with 64x64 tiles in 227 KiB
    only without the 16 KiB of slack, so it gets 2; a 99 KiB device (sm89) gets 2 stages for bf16 head dim 128."""
    for head_dim in (64, 128):
        assert _inductor_default((9, 0), head_dim, torch.bfloat16).block_m == 128
    pro = _inductor_default((9, 0), 128, torch.bfloat16)
    assert (pro.block_m, pro.block_n, pro.num_stages, pro.num_warps) == (128, 64, 3, 8)
    assert _as_lowered(flex.kernel_options(128, torch.bfloat16, (9, 0), "default"), pro)["num_warps"] == 8
    assert flex.kernel_options(128, torch.bfloat16, (9, 0)) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                                                               "num_stages": 3}
    assert flex.kernel_options(128, torch.float32, (9, 0))["num_stages"] == 2
    assert flex.kernel_options(128, torch.bfloat16, (8, 9))["num_stages"] == 2
    assert flex.kernel_options(64, torch.bfloat16, None) == {"BLOCK_M": 64, "BLOCK_N": 64}  # the CPU template
    with pytest.raises(ValueError, match="k5, default, autotune"):
        flex.kernel_options(64, torch.bfloat16, (9, 0), "fastest")


def test_autotune_choice_times_only_configs_whose_tiles_divide_the_blocks(monkeypatch):
    """"autotune" passes no knobs and makes inductor's choices offer, for a CUDA flex forward, the candidates whose
    tiles divide 64 and fit the device; other devices and every other kernel keep inductor's own choices."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    try:
        flex.set_flex_options("autotune")
        assert flex.flex_options() == "autotune" and flex.kernel_options(128, torch.bfloat16, (9, 0)) == {}
        configs = V.choices.get_flex_attention_fwd_configs(128, torch.bfloat16, "cuda")
        knobs = [(c.block_m, c.block_n, c.num_stages, c.num_warps) for c in configs]
        assert len(knobs) > 1 and (64, 64, 3, 4) in knobs
        assert all(64 % m == 0 and 64 % n == 0 and flex.tiles_fit((9, 0), 128, torch.bfloat16, m, n, s)
                   for m, n, s, _ in knobs)
        cpu = V.choices.get_flex_attention_fwd_configs(128, torch.float32, "cpu")
        assert cpu == InductorChoices().get_flex_attention_fwd_configs(128, torch.float32, "cpu")
    finally:
        flex.set_flex_options("k5")
    assert type(V.choices) is InductorChoices and flex.flex_options() == "k5"


def test_the_bench_refuses_to_time_nabla_over_eager_flex(monkeypatch, capsys):
    """bench/run.py would time dense attention as NABLA: it refuses with the same message (exit 2), and records the
    flex options it runs with (--flex-options)."""
    from k5.bench.run import main

    monkeypatch.setattr(flex, "_options", flex.flex_options())  # restored after the test
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    with pytest.raises(SystemExit) as e:
        main(["attention", "--nabla-kernel", "flex", "--device", "cpu", "--frames", "5", "--height", "128", "--width",
              "128", "--no-save"])
    assert e.value.code == 2 and "TORCHDYNAMO_DISABLE=1" in capsys.readouterr().err
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    r = main(["attention", "--flex-options", "default", "--device", "cpu", "--frames", "5", "--height", "128",
              "--width", "128", "--P-list", "0.5", "--repeat", "1", "--heads", "1", "--no-save"])
    assert r["config"]["flex_options"] == "default" and flex.flex_options() == "default"
