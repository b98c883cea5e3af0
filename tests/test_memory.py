"""The pre-load memory estimate: its weights against what loading really allocates, its refusal of a run that cannot
fit (exit 2 before any weight loads), and the pipeline's offload modes."""

import pytest
import torch

from k5.parallel import memory
from k5.engine.model.config import PRESETS
from k5.parallel.memory import (Shape, Weights, block_bytes_per_token, check_memory, device_capacity,
                              dit_activation_bytes, estimate, nabla_mask_bytes)
from k5.engine.pipelines.video import Kandinsky5Pipeline, Request
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.launch.generate import main
from k5.engine.checkpoints.dit import locate

GiB = 2**30


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_weights_are_what_loading_allocates():
    """From headers and the config alone, the same bytes the loaded components hold (fp32 on the CPU)."""
    root = tiny_checkpoint()
    cfg = locate(root).config
    w = Weights.of_checkpoint(root, cfg, torch.float32, "cpu")
    pipe = Kandinsky5Pipeline.from_pretrained(root, dtype=torch.float32, device="cpu")
    assert w.dit == _param_bytes(pipe.dit)
    assert w.text == _param_bytes(pipe.text.qwen) + _param_bytes(pipe.text.clip)  # no vision tower, no lm_head
    assert w.vae == _param_bytes(pipe.vae.vae)
    # bf16 weights are half, except those kept in fp32 (time embedding, modulation, q/k norms; CLIP).
    half = Weights.of_checkpoint(root, cfg, torch.bfloat16, "cpu")
    clip = _param_bytes(pipe.text.clip)
    assert w.dit / 2 < half.dit < w.dit and half.text == (w.text - clip) // 2 + clip


def _unique_bytes(*modules) -> int:
    """Bytes of the distinct tensors of ``modules`` (a head tied to the embedding is counted once)."""
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["video", "i2i"])
def test_expansion_head_and_vision_tower_are_what_loading_allocates(kind):
    """Prompt expansion loads Qwen's lm_head, an image prompt its vision tower: the estimate counts exactly the bytes
    those loads allocate (none for a head tied to the embedding), and nothing when they are not used."""
    from k5.engine.encoders.text import TextEncoder
    from k5.engine.checkpoints.qwen import load_vision_tower

    root = tiny_checkpoint() if kind == "video" else tiny_checkpoint(kind=kind)
    cfg = locate(root).config if kind == "video" else None
    if cfg is None:

        cfg = locate(root).config
    base = Weights.of_checkpoint(root, cfg, torch.float32, "cpu")
    text = TextEncoder.from_pretrained(root, torch_dtype=torch.float32, lm_head=True)
    with_head = Weights.of_checkpoint(root, cfg, torch.float32, "cpu", lm_head=True)
    assert with_head.text == _unique_bytes(text.qwen, text.lm_head, text.clip)
    assert base.text == _unique_bytes(text.qwen, text.clip)
    _, tower = load_vision_tower(root / "text_encoder", torch.float32, torch.device("cpu"))
    with_tower = Weights.of_checkpoint(root, cfg, torch.float32, "cpu", vision=True)
    assert with_tower.text - base.text == _param_bytes(tower) > 0


def test_estimate_phases_follow_offload():
    root = tiny_checkpoint()
    cfg = locate(root).config
    w = Weights(dit=10 * GiB, text=16 * GiB, vae=1 * GiB)
    shape = [Shape(121, 512, 768)]
    by_mode = {m: estimate(w, cfg, shape, torch.bfloat16, "cuda", m, False, root) for m in memory.OFFLOAD_MODES}
    none, text, model = (by_mode[m].phases for m in ("none", "text", "model"))
    # Denoising holds the DiT in every mode, the text encoders only without offload.
    assert none["denoise"] - text["denoise"] == w.text and text["denoise"] - model["denoise"] == w.vae
    # --offload model: the text phase holds the encoders alone, the decode the VAE alone.
    assert model["text"] < w.text + GiB and model["decode"] < text["decode"] - w.dit + 1
    assert by_mode["none"].peak > by_mode["text"].peak > by_mode["model"].peak
    # Lite's activations grow with the video (twice the frames: 1.5x and more), shrink with sequence parallelism.
    lite = PRESETS["lite"]
    act = lambda frames, **lay: dit_activation_bytes(lite, Shape(frames, 512, 768), torch.bfloat16, False, **lay)  # noqa
    assert act(241) > 1.5 * act(121) and act(121, sp=4, ulysses=4) < act(121) / 2


def test_tensor_parallel_splits_only_heads_and_ffn_activations():
    """Under --tp-degree the residual stream and the fp32 temporaries of modulate / gated_add stay full width on every
    rank (the row-wise layers all-reduce back to the full model_dim); only q/k/v, the attention output and the FFN
    hidden are split. Hand-worked for Pro (model_dim D 4096, ff_dim F 16384) in bf16 (2 bytes), per local token:
      full width: residual + modulated input (or the all-reduced sublayer output) 2*D*2 = 16384, four fp32
                  temporaries 4*D*4 = 65536: 81920 on every rank;
      split:      q, k, v, attention output 4*(D/tp)*2 and the FFN pair 2*(F/tp)*2:
                  tp 1: 32768 + 65536 = 98304;  tp 8: 4096 + 8192 = 12288.
    (The old rule divided everything by tp: 19456 bytes at tp 8, under a quarter of the 94208 here.)"""
    pro = PRESETS["pro"]
    assert (pro.model_dim, pro.ff_dim) == (4096, 16384)
    assert block_bytes_per_token(pro, torch.bfloat16, tp=1) == 81920 + 98304 == 180224
    assert block_bytes_per_token(pro, torch.bfloat16, tp=8) == 81920 + 12288 == 94208
    # Sequence-parallel buffers carry q/k/v and K/V, split like them: Ulysses send + receive 2*3*(D/tp)*2, ring two
    # K/V buffers 2*2*(D/tp)*2 and the fp32 accumulator (D/tp)*4; at tp 8 (D/tp = 512): 6144 + 4096 + 2048.
    assert block_bytes_per_token(pro, torch.bfloat16, ulysses=2, ring=2, tp=8) == 94208 + 6144 + 4096 + 2048
    # Into the whole DiT forward: Pro 5 s HD (768x1280x121: 31 x 48 x 80 = 119040 tokens, whole 64-token blocks, one
    # rank's share is all of them without sequence parallelism), the difference tp 1 - tp 8 is the tokens times the
    # per-token difference, with the estimate's 15 % allocator headroom (two int() roundings: 2 bytes).
    act = lambda tp: dit_activation_bytes(pro, Shape(121, 768, 1280), torch.bfloat16, False, tp=tp)  # noqa: E731
    assert abs((act(1) - act(8)) - 119040 * (180224 - 94208) * 1.15) <= 2


def test_nabla_mask_term_counts_every_row_and_key_block_a_rank_builds():
    """Pro 10 s HD (768x1280x241: 61 x 6 x 10 = 3660 tiles of 64 tokens, 32 heads) in bf16, hand-worked.

    Ulysses 4, ring 1 (the catalogue's layout): 915 tiles a rank, but after the all-to-all a rank builds mask rows
    for 32/4 = 8 heads over its span's 4 * 915 = 3660 query tiles and all 3660 key tiles: E = 8 * 3660 * 3660 =
    107164800 bools. At the kernel: the rows 1 + int64 positions 8 + int32 indices 4 = 13 bytes each: 1393142400,
    and the int32 tile counts of the 8 * 3660 rows (117120) and key-index ramp of 3660 (14640): 1393274160;
    building instead: the rows 1 and one top-CDF chunk (one head, 3660 * 3660 = 13395600 scores, 21 bytes each):
    107164800 + 281307600 = 388472400, smaller. Plus the STA prior 3660 * 3660 = 13395600: 1406669760.
    (The old term counted 915 query tiles, a quarter of the rows: 811284416 with its fixed 2**24 * 26 chunk.)

    Ulysses 4, ring 2: 458 tiles a rank (3664 padded, 3660 real); 8 heads x 4 * 458 = 1832 query tiles x 3664 key
    tiles: E = 53699584. Kernel, per ring step on E/2 = 26849792: the rows E + the step's copy 1 + 12 index bytes
    = 53699584 + 13 * 26849792 = 402746880, the counts of 8 * 1832 rows 58624 and the ramp of 1832 key tiles 7328:
    402812832. Building: the zero-filled padded rows E, the real columns' 8 * 1832 * 3660 = 53640960 and a chunk of
    two heads (2 * 1832 * 3660 = 13410240 scores x 21): 388955584, smaller. STA 3664 * 3664 = 13424896: 416237728.
    (Old term: 458 x 916 tiles, 483194752.)
    """
    assert nabla_mask_bytes(8, 3660, 3660, 3660, ring=1) == 1393274160 + 13395600 == 1406669760
    assert nabla_mask_bytes(8, 1832, 3664, 3660, ring=2) == 402812832 + 13424896 == 416237728
    pro = PRESETS["pro"]
    assert pro.num_heads == 32
    shape = Shape(241, 768, 1280)
    for layout, mask in (((4, 1), 1406669760), ((4, 2), 416237728)):
        u, r = layout
        act = lambda nabla: dit_activation_bytes(pro, shape, torch.bfloat16, nabla, sp=u * r, ulysses=u, ring=r)  # noqa
        assert abs((act(True) - act(False)) - mask * 1.15) <= 2, layout  # 15 % headroom; two int() roundings


def _allocated_peak(fn) -> int:
    """Peak bytes the CPU allocator held while ``fn`` ran, above what was held before (torch profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("chunk", [1 << 24, 1 << 12])  # the real chunk (building peaks), a small one (the kernel)
@pytest.mark.parametrize("heads, q_blocks, ring, k_valid", [(4, 256, 1, 256), (4, 256, 1, 250), (4, 128, 2, 250),
                                                            (2, 64, 8, 500)])
def test_nabla_mask_bytes_are_what_the_mask_code_allocates(monkeypatch, chunk, heads, q_blocks, ring, k_valid):
    """The count against the CPU allocator: one rank's mask as parallel/ring.py makes it (the rows, the & q_valid
    of sequence parallelism, each ring step's columns through flex.block_mask_from_tiles), measured by the torch
    profiler. The cached STA prior is built before; the pooled inputs are tiny (head dim 8). Tolerance 4 KiB: the
    profiler's own small allocations."""
    from k5.kernels import nabla
    from k5.kernels.flex import block_mask_from_tiles

    monkeypatch.setattr(nabla, "_MASK_CHUNK_ELEMS", chunk)
    k_blocks = ring * q_blocks
    g = torch.Generator().manual_seed(0)
    qp, kp = torch.randn(1, heads, q_blocks, 8, generator=g), torch.randn(1, heads, k_blocks, 8, generator=g)
    sta = torch.rand(q_blocks, k_blocks, generator=g) < 0.1
    q_valid = torch.ones(q_blocks, dtype=torch.bool)

    def mask_of_one_layer():
        rows = nabla.nabla_block_mask(qp, kp, sta, 0.7, k_valid=k_valid)
        rows = rows & q_valid[:, None]
        for src in range(ring):
            step = rows[..., src * q_blocks:(src + 1) * q_blocks].contiguous()
            block_mask_from_tiles(step, q_blocks * 64, q_blocks * 64, partial=True)

    measured = _allocated_peak(mask_of_one_layer)
    counted = nabla_mask_bytes(heads, q_blocks, k_blocks, k_valid, ring) - k_blocks * k_blocks  # less the STA prior
    assert abs(measured - counted) <= 4096, (measured, counted)


def _impossible_frames(root, cfg) -> int:
    """100001 frames (the issue's example), or more where this machine could hold that (the test must refuse)."""
    capacity, _ = device_capacity("cpu")
    frames = 100001
    while check_estimate(root, cfg, frames) <= capacity:
        frames = 4 * (2 * frames // 4) + 1
    return frames


def check_estimate(root, cfg, frames):
    w = Weights.of_checkpoint(root, cfg, torch.float32, "cpu")
    return estimate(w, cfg, [Shape(frames, 128, 128)], torch.float32, "cpu", "none", False, root).peak


def test_impossible_run_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    root = tiny_checkpoint()
    frames = _impossible_frames(root, locate(root).config)

    def no_loading(*a, **k):
        raise AssertionError("a weight was loaded before the memory check")

    monkeypatch.setattr(Kandinsky5Pipeline, "from_pretrained", no_loading)
    out = tmp_path / "long.mp4"
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompt", "a cat", "--num-frames", str(frames), "--device", "cpu",
              "--output", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "this run needs an estimated" in err and "GiB" in err, err
    assert "these settings would fit: --num-frames" in err  # what would fit
    assert not out.exists()


# torch.cuda calls that open a CUDA context (or go through the lazy init that does); is_available and device_count
# do not, and the fake below answers them as a machine with two GPUs.
CONTEXT_CALLS = ("_lazy_init", "init", "set_device", "mem_get_info", "get_device_properties", "get_device_capability",
                 "get_device_name", "current_device", "synchronize", "memory_allocated", "max_memory_allocated",
                 "memory_reserved", "max_memory_reserved", "reset_peak_memory_stats", "memory_stats", "empty_cache",
                 "cudart")


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch.cuda says two GPUs are here; every context-opening call is recorded (returned list) and raises."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in CONTEXT_CALLS:
        def trap(*a, _name=name, **k):
            calls.append(_name)
            raise AssertionError(f"torch.cuda.{_name} was called: it opens a CUDA context")

        monkeypatch.setattr(torch.cuda, name, trap)
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_the_launcher_on_gpus_opens_no_cuda_context(tmp_path, monkeypatch, no_loading, two_fake_gpus):
    """``--nproc-per-node N`` on GPUs: the launching process stays alive for the whole job, so a CUDA context of its
    own (torch.cuda.mem_get_info opens one) would hold GPU 0 memory throughout. It checks the inputs and starts the
    workers without a single context-opening call; the memory check is the workers' (next test)."""
    from k5.launch import workers

    started = []
    monkeypatch.setattr(workers, "start_workers", lambda n, argv: started.append(n) or 0)
    out = tmp_path / "cat.mp4"
    code = main(["--nproc-per-node", "2", "--model", "tiny", "--prompt", "a cat", "--device", "cuda", "--output",
                 str(out)])
    assert code == 0 and started == [2] and two_fake_gpus == []
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the workers must refuse: a machine without CUDA")
def test_the_launcher_and_its_agent_open_no_cuda_context_and_return_the_workers_refusal(tmp_path, capfd, no_loading,
                                                                                        two_fake_gpus):
    """The same with the real torch.distributed agent: two worker processes start (where CUDA really is missing, so
    each refuses --device cuda with exit 2 before loading; rank 0 says why) while the launcher, which sees two GPUs,
    makes no context-opening call and exits with the workers' 2."""
    out = tmp_path / "cat.mp4"
    code = main(["--nproc-per-node", "2", "--model", "tiny", "--prompt", "a cat", "--device", "cuda", "--output",
                 str(out)])
    assert code == 2 and two_fake_gpus == [] and not out.exists()
    err = capfd.readouterr().err  # the workers' stderr is this process's file descriptor 2
    assert err.count("error:") == 1 and "error: --device cuda: CUDA is not available here" in err, err


def test_a_worker_checks_its_own_gpu_and_refuses_before_loading(tmp_path, monkeypatch, capsys, no_loading,
                                                                  two_fake_gpus):
    """What the launcher leaves to them: each torchrun worker (rank 0 of 2 here) compares its estimate with its own
    GPU's free memory and refuses with exit 2 before any weight loads; the launcher returns that code."""
    used = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: used.append(("set_device", str(d))))
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda d: used.append(("mem_get_info", str(d))) or (2**20, 80 * GiB))  # 1 MiB free
    for var, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    out = tmp_path / "cat.mp4"
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompt", "a cat", "--device", "cuda", "--output", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "this run needs an estimated" in err and "cuda:0 (0.0 of 80.0 GiB free)" in err
    assert used == [("set_device", "cuda:0"), ("mem_get_info", "cuda:0")] and two_fake_gpus == []
    assert not out.exists()


def test_the_launcher_on_the_cpu_still_refuses_an_impossible_run(tmp_path, monkeypatch, capsys, no_loading):
    """On the CPU the capacity needs no CUDA: the launching process refuses a run that cannot fit, before any worker
    starts (exit 2, one line)."""
    from k5.launch import workers

    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(workers, "start_workers", lambda *a: pytest.fail("a worker was started"))
    root = tiny_checkpoint()
    frames = _impossible_frames(root, locate(root).config)
    out = tmp_path / "long.mp4"
    with pytest.raises(SystemExit) as e:
        main(["--nproc-per-node", "2", "--model", "tiny", "--prompt", "a cat", "--num-frames", str(frames),
              "--device", "cpu", "--output", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "this run needs an estimated" in err, err
    assert not out.exists()


def test_check_memory_passes_an_ordinary_run():
    root = tiny_checkpoint()
    cfg = locate(root).config
    est = check_memory(root, cfg, [Shape(9, 128, 128)], torch.float32, "cpu", "none", False)
    assert 0 < est.peak < GiB and est.peak_phase in est.phases


def test_offload_model_and_released_text_encoders_give_the_same_latents():
    root = tiny_checkpoint()
    req = Request(prompt="a red fox", height=128, width=128, num_frames=5, steps=1, seed=3)
    want = Kandinsky5Pipeline.from_pretrained(root, dtype=torch.float32, device="cpu").generate(req).latents
    pipe = Kandinsky5Pipeline.from_pretrained(root, dtype=torch.float32, device="cpu", offload="model")
    assert pipe.resident() == ["DiT", "text encoders", "VAE"]  # the device is the CPU here: all of it is home
    pipe.text_after_encode = "release"
    got = pipe.generate(req).latents
    assert torch.equal(got, want)  # bitwise: on the CPU nothing moves, the same file's weights run the same ops
    assert pipe.text.qwen is None and "text encoders" not in pipe.resident()
    with pytest.raises(RuntimeError, match="release"):
        pipe.generate(req)


# ---- issue 19: Pro's weights, the kept text encoders, the decode's tile buffers, cuBLAS and NCCL ------------------


def test_pro_weights_by_hand_and_per_tensor_parallel_rank():
    """Pro's DiT from the architecture note's key list (section 2.9; D 4096, F 16384, Tm 1024, hd 128, 4 text and
    60 visual blocks), fp32 where k5 keeps it (time embedding, modulation, q/k norms), bf16 elsewhere: 40.41 GiB, of
    them 8.85 GiB fp32 modulation (not 38). Per rank at --tp-degree 8: the tensors the tp plan cuts at 1/8, the
    replicated ones whole (embeddings, norms, the row-wise layers' biases, the final projection), instead of 1/8 of
    everything."""
    D, F, Tm, hd = 4096, 16384, 1024, 128
    mod_visual, mod_text, mod_out = (9 * D * Tm + 9 * D) * 4, (6 * D * Tm + 6 * D) * 4, (2 * D * Tm + 2 * D) * 4
    embed = ((Tm * D + Tm) + (Tm * Tm + Tm)) * 4 + (D * 3584 + D + 2 * D) * 2 + (Tm * 768 + Tm + 2 * Tm) * 2 \
        + (D * 4 * 33 + D) * 2 + (64 * D + 64) * 2
    # split by tp: q/k/v weights and biases, out weights, FFN, modulation; replicated: out biases, q/k norms
    visual_split, visual_repl = (2 * (4 * D * D + 3 * D) + 2 * D * F) * 2 + mod_visual, 2 * D * 2 + 4 * hd * 4
    text_split, text_repl = (4 * D * D + 3 * D + 2 * D * F) * 2 + mod_text, D * 2 + 2 * hd * 4
    split = 60 * visual_split + 4 * text_split + mod_out
    repl = 60 * visual_repl + 4 * text_repl + embed
    assert split + repl == 43385792640 and round((split + repl) / GiB, 2) == 40.41
    assert round((60 * mod_visual + 4 * mod_text + mod_out) / GiB, 2) == 8.85
    root = tiny_checkpoint()
    pro = PRESETS["pro"]
    assert Weights.of_checkpoint(root, pro, torch.bfloat16, "cuda").dit == split + repl
    assert Weights.of_checkpoint(root, pro, torch.bfloat16, "cuda", tp=8).dit == split // 8 + repl


def test_text_source_keeps_the_encoders_through_a_parallel_batch():
    """On more than one rank the text encoders sit on the text source, out of --offload's reach
    (parallel/text_share.py): freed after a single video's encode (keep=False), kept on the device through a
    batch (keep=True). The denoise and decode phases differ by exactly the encoders' bytes, whatever --offload says;
    on one process --offload text keeps moving them off the device."""
    root = tiny_checkpoint()
    cfg = locate(root).config
    w = Weights(dit=10 * GiB, text=16 * GiB, vae=1 * GiB)
    shape = [Shape(121, 512, 768)]
    layout = dict(sp=2, ulysses=2)
    for offload in ("none", "text"):
        kept = estimate(w, cfg, shape, torch.bfloat16, "cuda", offload, False, root, keep_text=True, **layout)
        freed = estimate(w, cfg, shape, torch.bfloat16, "cuda", offload, False, root, keep_text=False, **layout)
        for phase in ("denoise", "decode"):
            assert kept.phases[phase] - freed.phases[phase] == w.text, (offload, phase)
        assert kept.phases["text"] == freed.phases["text"]
    one = estimate(w, cfg, shape, torch.bfloat16, "cuda", "text", False, root, keep_text=True)
    assert one.phases["denoise"] < one.phases["text"] - w.text + GiB


def test_the_cli_counts_kept_encoders_for_a_batch_on_several_ranks(tmp_path, monkeypatch, no_loading):
    """A prompt file of two items on two ranks (the launching process checks the memory on the CPU): the estimate
    is asked with keep_text and the layout's degrees; one item: without keep_text."""
    from k5.launch import workers

    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    seen = []
    real = memory.check_memory
    monkeypatch.setattr(memory, "check_memory", lambda *a, **k: seen.append(k) or real(*a, **k))
    monkeypatch.setattr(workers, "start_workers", lambda n, argv: 0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    assert main(["--nproc-per-node", "2", "--model", "tiny", "--prompts", str(prompts), "--device", "cpu",
                 "--output-dir", str(tmp_path / "out")]) == 0
    assert main(["--nproc-per-node", "2", "--model", "tiny", "--prompt", "a cat", "--device", "cpu",
                 "--output", str(tmp_path / "cat.mp4")]) == 0
    assert [k["keep_text"] for k in seen] == [True, False]
    assert all(k["sp"] * k["tp"] * k["cfg_degree"] * k["dp"] == 2 for k in seen)


def test_vae_gather_term_is_the_buffers_a_parallel_decode_allocates():
    """Rank 0 of a decode split over 3 ranks (torch's fake process group: real tensors, no peers) holds its packed
    tiles and 3 receive buffers of the largest rank's share; parallel_decode counts the decoded pixels it held on
    the CPU (DecodeStats.peak_bytes: those buffers and the blended video, from the tensors' sizes). The estimate's
    term, from the config and the library's tile sizes alone, is those buffers exactly; with one rank it is 0."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from k5.engine.vae.video import VideoVAE
    from k5.parallel.vae_tiles import parallel_decode, plan_tiles

    root = tiny_checkpoint()
    ae = VideoVAE.from_pretrained(root / "vae", torch_dtype=torch.float32).vae
    shape = Shape(17, 288, 288)  # latent 5 x 36 x 36: 2 temporal windows x 2 x 2 spatial tiles
    latents = torch.randn(1, 5, 36, 36, ae.config.latent_channels)
    assert len(plan_tiles(latents.shape, ae)) == 8
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
    try:
        _, stats = parallel_decode(ae, latents, dst=0, to_uint8=False)
    finally:
        dist.destroy_process_group()
    video = 3 * 17 * 288 * 288 * 4  # the blended fp32 video
    assert stats.peak_kind == "cpu_tile_buffers" and stats.sent_bytes > 0
    assert memory.vae_gather_bytes(root, shape, "cpu", 3) == stats.peak_bytes - video == 4 * stats.sent_bytes
    assert memory.vae_gather_bytes(root, shape, "cpu", 1) == 0
    # In the estimate: the decode phase of a parallel job holds them on top of the single-process decode.
    cfg = locate(root).config
    w = Weights(dit=GiB, text=GiB, vae=GiB)
    par = estimate(w, cfg, [shape], torch.float32, "cpu", "text", False, root, sp=3, ulysses=3)
    alone = estimate(w, cfg, [shape], torch.float32, "cpu", "text", False, root)  # the decode: DiT and VAE alone
    assert par.phases["decode"] - alone.phases["decode"] == 4 * stats.sent_bytes


def test_cublas_and_nccl_terms_by_hand():
    """On a GPU every phase holds cuBLAS's workspace (32 MiB + 1 MiB cuBLASLt, torch's defaults on sm90+) and, with
    more than one process, NCCL's buffers: per communicator of several ranks and per all-to-all or ring peer
    (documented constants in parallel/memory.py). Hand-worked:
      tp 8: world, item, replica, tp -> 4 communicators, no peers;
      Ulysses 2 x ring 4: world, item, replica, sp, ulysses, ring -> 6, peers 1 + 2 (next and previous);
      Ulysses 4 x ring 2: the same 6, peers 3 + 1 (in a ring of 2 the next rank is the previous one);
      ring 2 alone: world, item, replica, sp, ring -> 5, one peer;
      dp 2 of one rank each: the world's only.
    None of it on the CPU, where gloo's buffers are small and host memory."""
    C, P = memory.NCCL_COMMUNICATOR, memory.NCCL_PEER
    assert memory.CUBLAS_WORKSPACE == 33 * 2**20
    assert memory.nccl_bytes(tp=8) == 4 * C
    assert memory.nccl_bytes(sp=8, ulysses=2, ring=4) == 6 * C + 3 * P
    assert memory.nccl_bytes(sp=8, ulysses=4, ring=2) == 6 * C + 4 * P
    assert memory.nccl_bytes(sp=2, ring=2) == 5 * C + P
    assert memory.nccl_bytes(dp=2) == C and memory.nccl_bytes() == 0
    root = tiny_checkpoint()
    cfg = locate(root).config
    w = Weights(dit=GiB, text=GiB, vae=GiB)
    shape = [Shape(9, 128, 128)]
    for device_type, extra in (("cuda", memory.CUBLAS_WORKSPACE + 4 * C), ("cpu", 0)):
        tp8 = estimate(w, cfg, shape, torch.bfloat16, device_type, "none", False, root, tp=8)
        tp1 = estimate(w, cfg, shape, torch.bfloat16, device_type, "none", False, root)
        base = memory.CUBLAS_WORKSPACE if device_type == "cuda" else 0
        # tp 8 also splits the activations: compare the text phase, which holds none of them
        assert tp8.phases["text"] - tp1.phases["text"] == extra - base, device_type
