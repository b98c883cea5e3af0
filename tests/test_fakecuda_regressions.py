"""The fake-CUDA harness fails on each GPU defect k5 has had, when it is put back (monkeypatch), and passes without it.

- 128-wide flex tiles: flex_attention called without BLOCK_M / BLOCK_N (before 34fcb9c), so inductor takes its sm90
  and sm100 defaults, 128 query rows, which do not divide the 64-token NABLA blocks ("Q and KV block size must be
  divisible by BLOCK_M and BLOCK_N" at the first forward on a GPU).
- ``--device cuda`` in the wrong place: ``torch.device("cuda")`` taken as is (before 9f117e8) is the current device,
  GPU 0, on every rank of the node, not cuda:LOCAL_RANK.
- an extra ``.item()`` in the step loop: the text-mask decision per forward (before 596ae5a), one device-to-host sync
  per text block and forward.
- a host tensor fed to a collective: the text header's pickle sent from host memory (what SharedText._comm_device
  prevents: NCCL takes CUDA tensors only).
- the host-to-device copies of item 1 of issue 19: RoPE and time tables rebuilt from host data at every forward.
"""

import re

import pytest
import torch

from fakecuda import COLLECTIVE, H2D, FakeCuda, FlexCall, flex_tile_problems
from fakecuda_runs import Run, check, model_config, parallel_text, run_rank
from k5.parallel.plan import plan_parallel

NABLA_CASE = ("lite-10s-nabla", {"ring": 2, "ulysses": 4}, 7)  # head dim 64: inductor's sm90 default is 128 x 128


def problems_with(*case, **kw) -> list[str]:
    return check(run_rank(*case, **kw))


def test_128_wide_flex_tiles(monkeypatch):
    import torch.nn.attention.flex_attention as flex_module

    real = flex_module.flex_attention

    def without_tiles(*args, kernel_options=None, **kwargs):
        options = {k: v for k, v in (kernel_options or {}).items() if k not in ("BLOCK_M", "BLOCK_N")}
        return real(*args, kernel_options=options, **kwargs)

    assert problems_with(*NABLA_CASE) == []
    monkeypatch.setattr(flex_module, "flex_attention", without_tiles)
    problems = problems_with(*NABLA_CASE)
    assert problems and all("flex tiles: BLOCK_M 128 x BLOCK_N 128 does not divide the 64x64 mask blocks" in p
                            for p in problems), problems
    assert any("sm90" in p for p in problems) and any("sm100" in p for p in problems)


def test_the_flex_tile_rule_against_inductors_tables():
    """Inductor's forward defaults (torch/_inductor/template_heuristics/triton.py, CUDAConfigHeuristic): bf16 head
    dim 64 is 128 x 128 on sm90 and sm100, head dim 128 is 128 x 64; pinned 64 x 64 tiles always divide 64."""
    bf16 = torch.bfloat16
    pinned = {"BLOCK_M": 64, "BLOCK_N": 64}
    for head_dim in (64, 128):
        for capability in ((9, 0), (10, 0)):
            assert flex_tile_problems(FlexCall(head_dim, bf16, 64, 64, pinned), capability) == []
            assert flex_tile_problems(FlexCall(head_dim, bf16, 128, 128, {}), capability) == []
    assert flex_tile_problems(FlexCall(64, bf16, 64, 64, {}), (9, 0)) == [
        "BLOCK_M 128 x BLOCK_N 128 does not divide the 64x64 mask blocks (head dim 64, torch.bfloat16, sm90)"]
    assert flex_tile_problems(FlexCall(128, bf16, 64, 64, {"BACKEND": "AUTO"}), (10, 0)) == [
        "BLOCK_M 128 x BLOCK_N 64 does not divide the 64x64 mask blocks (head dim 128, torch.bfloat16, sm100)"]
    assert flex_tile_problems(FlexCall(128, bf16, 64, 64, {"fwd_BLOCK_M": 64}), (9, 0)) == []


def test_device_cuda_in_the_wrong_place(monkeypatch):
    from k5.launch import env as launch_env

    case = ("pro-5s-sd", {"cfg": 2, "ring": 2, "tp": 2}, 5)
    assert problems_with(*case) == []
    monkeypatch.setattr(launch_env, "resolve_device", lambda spec, local_rank, ranks_here=1: torch.device(spec))
    problems = problems_with(*case)
    assert any(p.startswith("latents") and p.endswith("float32 on cuda:5") and "on cuda:0" in p for p in problems)
    assert any("a collective got tensors not on this rank's GPU cuda:5" in p for p in problems), problems


def test_an_extra_item_in_the_step_loop(monkeypatch):
    from k5.engine.model import dit

    real = dit.attention

    def mask_decided_per_forward(q, k, v, key_mask=None):
        if key_mask is not None and key_mask.all().item():
            key_mask = None
        return real(q, k, v, key_mask=key_mask)

    monkeypatch.setattr(dit, "attention", mask_decided_per_forward)
    problems = problems_with("lite-5s", {"cfg": 2, "ulysses": 4}, 7)
    # The read has no data on fake tensors: the run stops there (DataDependentOutputException), and says where.
    assert problems[0].startswith("DataDependentOutputException"), problems
    assert len(problems) == 2 and re.fullmatch(r"device-to-host sync in the step loop: device-to-host sync "
                                               r"aten.item.default at engine/model/dit.py:forward:\d+ \(step 0, devices "
                                               r"\['cuda:7'\]\)", problems[1]), problems


def text_share_run(rank: int) -> Run:
    """The text path of rank ``rank`` (a replica's text source) of u4 x r2: encode, broadcast the header and the
    embeddings to its replica."""
    cfg = model_config("lite", 2)
    with FakeCuda(rank, 8) as fc:
        dims = fc.build_mesh(plan_parallel(8, cfg, ulysses=4, ring=2))
        with torch.inference_mode():
            embeds = parallel_text(fc, cfg, dims, None).encode(["a cat"])
        run = Run(fc, ())
    assert embeds.embeds.device == fc.gpu and embeds.embeds.shape == (1, 256, cfg.in_text_dim)
    return run


def test_a_host_tensor_fed_to_a_collective(monkeypatch):
    from k5.parallel.text_share import SharedText

    run = text_share_run(0)
    assert check(run) == [] and len(run.fc.watch.of(COLLECTIVE)) == 5  # header size, header, embeds, mask, pooled
    monkeypatch.setattr(SharedText, "_comm_device", lambda self: torch.device("cpu"))
    problems = check(text_share_run(0))
    assert len(problems) == 2 and all("a collective got tensors not on this rank's GPU cuda:0" in p
                                      and "devices ['cpu']" in p for p in problems), problems


def test_tables_rebuilt_from_host_data_at_every_forward(monkeypatch):
    from k5.engine.model.dit import DeviceTables

    case = ("lite-5s", {"cfg": 2, "ulysses": 4}, 7)
    monkeypatch.setattr(DeviceTables, "get", lambda self, key, build: build())
    run = run_rank(*case)
    late = [e for e in run.fc.watch.of(H2D, steady=True)]
    # Step 1, the CFG-cond half's one forward (cfg2): time frequencies, text RoPE, and the three visual RoPE axes.
    assert sorted(e.site for e in late) == ["engine/model/dit.py:_device_freqs", "engine/model/dit.py:_text_rope"] + \
        ["engine/model/dit.py:rope_angles_3d"] * 3
    assert sum(p.startswith("host-to-device copy in a step after the first") for p in check(run)) == 5


@pytest.mark.parametrize("index", [(0,), (slice(1, 3),), (Ellipsis, 0), (slice(None), None, 1), (1, slice(0, 4, 2)),
                                   (torch.tensor([0, 2]),), (slice(None), torch.tensor([1, 0]))])
def test_the_shims_indexing_matches_torch(index):
    """Indexing fake CUDA tensors goes through the shim's aten route: the same shapes as torch's own indexing."""
    real = torch.zeros(3, 4, 5)
    with FakeCuda() as fc:
        fake = torch.zeros(3, 4, 5, device=fc.device)
        idx = tuple(i.to(fc.device) if isinstance(i, torch.Tensor) else i for i in index)
        got = fake[idx]
        fake[idx] = 1.0
    assert got.shape == real[index].shape and got.device == fc.gpu


def test_the_harness_leaves_torch_as_it_found_it():
    """What a FakeCuda context changes in torch is undone at its exit, so the tests that share its process run as in
    a fresh one (both leaks below broke transformers' Qwen2.5-VL and CLIP in later tests of the same xdist worker):

    - Tensor's C sequence slot, filled by the ``__getitem__`` shim: afterwards ``torch.tensor`` of a list of 0-d
      tensors raised "len() of a 0-d tensor" (transformers' rope index builds one);
    - torch.device's cached set of factory functions, built in here with the ``torch.tensor`` shim in it:
      afterwards ``torch.tensor`` under ``with torch.device("meta")`` made CPU tensors, and transformers left CLIP's
      position ids unset (from_pretrained builds on meta and fills only what it moved off meta).
    """
    with FakeCuda(1, 2) as fc:
        x = torch.arange(6, device=fc.device)
        x[1:3] = x[3:5]  # both shims
        with torch.device("meta"):
            torch.tensor([1.0])  # the device context's factory set is made here, if not before
    assert torch.tensor([torch.tensor(1), torch.tensor(2)]).tolist() == [1, 2]
    with torch.device("meta"):
        assert torch.tensor([1.0]).device.type == "meta"
        assert torch.as_tensor([1.0]).device.type == "meta"
