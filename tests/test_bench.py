"""Smoke tests of the bench CLI on tiny shapes: it must run and its reported facts must be right (not fast).

What is checked against something independent: our output against diffusers' on the same saved weights; the
2-process run against the 1-process forward; the NABLA kernel against dense SDPA with the tile mask expanded;
FLOPs and densities against values worked out by hand. Timings are only checked for being positive and
consistent with the FLOP count.
"""

import json
import sys
from pathlib import Path

import pytest

from k5.bench import flops
from k5.bench.projection import Layout, comm_bytes
from k5.bench.run import TINY, main
from distributed import run_distributed

FAST = ["--warmup", "0", "--repeat", "1", "--peak-tflops", "1", "--threads", "1"]


def test_dit_beside_diffusers_writes_json_and_markdown(tmp_path):
    r = main(["--model", "tiny", "--height", "128", "--width", "128", "--frames", "5", "--peer", "diffusers",
              "--vae", "tiny", "--vae-repeat", "1", "--out", str(tmp_path), "--name", "smoke", *FAST])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["timing"] == r["timing"]
    assert "| s_per_forward |" in (tmp_path / "smoke.md").read_text()
    # Same weights through both models: fp32 agreement bounded by diffusers' bf16 rounding of q, k in its RoPE.
    assert r["checks"]["diffusers_rel_err"] <= 1e-3
    # 5 frames at 128x128: latent 2 x 16 x 16, patches 2 x 8 x 8 = 128 visual tokens; 256 text tokens.
    assert r["config"]["visual_tokens"] == 128
    count = flops.forward_flops(TINY, 128, 256)
    assert r["flops"]["total"] == pytest.approx(count.total / 1e12)
    t = r["timing"]
    assert t["s_per_forward"] > 0 and t["s_per_step"] > 0 and t["diffusers_s_per_forward"] > 0
    assert t["tflops_per_device"] == pytest.approx(count.total / t["s_per_forward"] / 1e12)
    assert t["mfu"] == pytest.approx(t["tflops_per_device"])  # against the given 1 TFLOP/s peak
    assert t["ours_over_diffusers"] == pytest.approx(t["s_per_forward"] / t["diffusers_s_per_forward"])
    assert r["vae"]["s_per_decode"] > 0 and r["vae"]["latent"] == [1, 2, 16, 16, 16]
    assert r["env"]["torch"] and r["env"]["device_type"] == "cpu"


def test_nabla_density_from_the_masks(tmp_path):
    """384x384 at 5 frames: a 2 x 3 x 3 tile grid. The STA prior (11, 3, 3) keeps, per frame pair (all within the
    temporal window), (2+3+2)^2 = 49 of 81 spatial tile pairs: 196 of 324 = 0.605. P = 1 keeps every tile; P = 0
    keeps STA plus at most one tile per row (the top-CDF rule keeps the largest tile)."""
    common = ["--model", "tiny", "--height", "384", "--width", "384", "--frames", "5", "--attention", "nabla",
              "--vae", "none", "--no-save", *FAST]
    full = main([*common, "--P", "1.0"])
    sparse = main([*common, "--P", "0.0"])
    assert full["nabla"]["density"] == 1.0
    assert sparse["nabla"]["sta_density"] == pytest.approx(196 / 324)
    nk = 18
    assert 196 / 324 <= sparse["nabla"]["density"] <= 196 / 324 + 1 / nk
    dense_attn = flops.forward_flops(TINY, 1152, 256).self_attention
    assert sparse["flops"]["self_attention"] == pytest.approx(sparse["nabla"]["density"] * dense_attn / 1e12)


def test_attention_subcommand_checks_nabla_against_masked_dense():
    r = main(["attention", "--height", "384", "--width", "384", "--frames", "5", "--heads", "2", "--head-dim", "16",
              "--P-list", "0.3", "1.0", "--no-save", "--compare-flex-options", "default", "k5", *FAST])
    assert r["config"]["tokens"] == 1152
    # the flex kernel options set only the CUDA kernel: a CPU run says it compared nothing, and the summary says so
    assert r["flex_options_compare"]["measured"] is False and "CPU" in r["flex_options_compare"]["why"]
    from k5.bench.summary import flex_choice

    assert "not measured on CPU" in flex_choice(r["flex_options_compare"])[1]
    gpu = {"measured": True, "P": 0.05, "density": 0.2, "fastest": "k5",
           "rows": [{"options": "default", "s_block_sparse_kernel": 0.004},
                    {"options": "k5", "s_block_sparse_kernel": 0.003}]}
    assert flex_choice(gpu)[1] == "default 4.00 ms, k5 3.00 ms at P 0.05 (density 0.200); fastest: k5"
    low, full = r["nabla"]
    assert low["rel_err_vs_masked_dense"] <= 1e-5 and full["rel_err_vs_masked_dense"] <= 1e-5
    assert full["density"] == 1.0 and 0 < low["density"] < 1.0
    assert low["speedup_vs_dense"] > 0


def _two_ranks(rank, world_size, out):
    runs = {}
    for flag in ("--ulysses", "--ring", "--tp"):
        runs[flag] = main(["--model", "tiny", "--height", "128", "--width", "128", "--frames", "5", flag, "2",
                           "--vae", "tiny" if flag == "--ulysses" else "none", "--vae-repeat", "1", "--out", out,
                           "--name", f"w2{flag}", *FAST])
    return runs


def test_two_processes_match_one_and_count_bytes(tmp_path):
    runs = run_distributed(_two_ranks, 2, str(tmp_path))[0]
    r = runs["--ulysses"]
    assert r["config"]["layout"] == {"ulysses": 2}
    # Ulysses: per visual block 4 all-to-alls (q, k, v, out) of this rank's [64 tokens, 64 channels] fp32, half of
    # each leaving the rank; then one all-gather of the 64-channel output (64 tokens x 64 x 4 B to 1 peer).
    sent = r["comm_bytes_per_rank"]["forward"]
    per_buffer = 64 * 64 * 4
    assert sent["all_to_all"]["bytes"] == TINY.num_visual_blocks * 4 * per_buffer // 2
    assert sent["all_gather"]["bytes"] == 64 * 64 * 4
    step = r["comm_bytes_per_rank"]["step"]
    assert {k: v["bytes"] for k, v in step.items()} == {k: 2 * v["bytes"] for k, v in sent.items()}
    assert len(r["memory"]["peak_gib_per_rank"]) == 2
    assert r["vae"]["parallel_tiles"] and (tmp_path / "w2--ulysses.json").exists()
    for flag, lay in (("--ulysses", Layout(ulysses=2)), ("--ring", Layout(ring=2)), ("--tp", Layout(tp=2))):
        r = runs[flag]
        assert r["checks"]["layout_rel_err"] <= 1e-5, flag  # fp32, 2 processes against the 1-process forward
        # The projection's byte model (fp32 here) against the bytes the real collectives counted.
        counted = {k: (v["bytes"], v["calls"]) for k, v in r["comm_bytes_per_rank"]["forward"].items()}
        modelled = {k: (v["bytes"], v["calls"]) for k, v in comm_bytes(TINY, 128, 256, lay, elem=4).items()}
        assert counted == modelled, flag


def test_projection_one_gpu_is_the_flop_count_over_the_rates(tmp_path):
    from k5.bench import projection

    r = projection.main(["--shapes", "5s-sd", "--gpus", "1", "8", "16", "--out", str(tmp_path)])
    assert "PROJECTION" in (tmp_path / "projection-pro.md").read_text()
    one, eight, sixteen = r["rows"]
    f = flops.forward_flops(projection.PRESETS["pro"], 31 * 32 * 48, 256)
    rates = r["rates_tflops"]
    by_hand = f.linear / rates["linear"] / 1e12 + f.attention / rates["dense_attention"] / 1e12
    assert one["comm_s_per_forward"] == 0 and one["s_per_step"] == pytest.approx(2 * by_hand)
    assert one["efficiency"] == 1.0 and 0 < sixteen["efficiency"] <= eight["efficiency"] <= 1.0
    # 16 GPUs are two nodes of 8: the chosen layout's groups that leave a node run at the InfiniBand rate.
    assert sixteen["gpus"] == 16 and eight["s_per_step"] > sixteen["s_per_step"]


def test_results_carry_their_spread_and_go_to_a_scratch_folder(tmp_path):
    from k5.bench import fast, report
    from k5.bench.run import parser

    steady, noisy = fast.spread([1.0, 1.1, 1.2]), fast.spread([1.0, 1.1, 1.5])
    assert (steady["min"], steady["median"], steady["max"]) == (1.0, 1.1, 1.2) and not steady["unstable"]
    assert noisy["unstable"] and noisy["max_over_min"] == pytest.approx(1.5)  # max/min > 1.3
    # Nothing is written under the committed bench/results unless it is named.
    assert parser().parse_args([]).out == str(report.SCRATCH)
    from k5.bench.magcache import parser as magcache_parser  # the README's `bench magcache` example too

    assert magcache_parser().parse_args([]).out == str(report.SCRATCH)
    assert report.RESULTS not in report.SCRATCH.resolve().parents and report.SCRATCH != report.RESULTS
    r = main(["--model", "tiny", "--height", "128", "--width", "128", "--frames", "5", "--vae", "none",
              "--out", str(tmp_path), "--name", "spread", "--json-only", *FAST[:2], "--repeat", "2", *FAST[4:]])
    f = r["timing"]["forward_s"]
    assert f["min"] <= f["median"] <= f["max"] and f["unstable"] == (f["max"] / f["min"] > 1.3)
    assert isinstance(r["unstable"], list)
    assert [p.name for p in tmp_path.iterdir()] == ["spread.json"]  # --json-only: no Markdown beside it


def test_a_run_stopped_after_the_forward_timing_keeps_it(tmp_path, monkeypatch):
    """The JSON is written once the forward is timed: a run killed later (its time cap) leaves the forward's
    figures on disk, marked incomplete; the finished run drops the mark."""
    from k5.bench import fast

    calls, real = [], fast.time_calls

    def killed_at_the_step(fn, *args, **kwargs):
        calls.append(fn)
        if len(calls) == 2:  # the first timing is the forward's, the second the CFG step's
            raise KeyboardInterrupt("killed at its cap")
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(fast, "time_calls", killed_at_the_step)
    common = ["--model", "tiny", "--height", "128", "--width", "128", "--frames", "5", "--vae", "none",
              "--out", str(tmp_path), "--json-only", *FAST]
    with pytest.raises(KeyboardInterrupt):
        main([*common, "--name", "cut"])
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["timing"]["s_per_forward"] > 0 and "s_per_step" not in cut["timing"]
    assert "step" in cut["incomplete"] and cut["flops"]["total"] > 0 and cut["env"]["device_type"] == "cpu"
    monkeypatch.setattr(fast, "time_calls", real)
    done = main([*common, "--name", "done", "--step-repeat", "2"])
    saved = json.loads((tmp_path / "done.json").read_text())
    assert "incomplete" not in saved and len(saved["timing"]["step_runs_s"]) == 2
    assert saved["timing"] == done["timing"] and len(saved["timing"]["forward_runs_s"]) == 1


def test_mask_replay_runs_the_given_masks_and_counts_agreement():
    """MaskReplay attends on the recorded masks, not on what it would select itself, and counts where the two agree;
    it refuses a call beyond the recorded masks."""
    import torch

    from k5.bench.run import MaskReplay
    from k5.engine.model.dit import TokenGrid
    from k5.kernels.nabla import NablaSpec, block_sparse_attention, nabla_mask

    g = torch.Generator().manual_seed(0)
    grid = TokenGrid(2, 16, 16, fractal=True)  # 2 x 2 x 2 tiles of 64 tokens
    q, k, v = (torch.randn(1, 512, 2, 8, generator=g) for _ in range(3))
    spec = NablaSpec(P=0.1)
    own = nabla_mask(q, k, spec, *grid.blocks)
    given = torch.eye(8, dtype=torch.bool).expand(1, 2, 8, 8).clone()  # each query tile on itself only
    replay = MaskReplay(spec, [given])
    out = replay(q, k, v, grid)
    assert torch.equal(out, block_sparse_attention(q, k, v, given, return_lse=False)[0])
    assert not torch.allclose(out, block_sparse_attention(q, k, v, own, return_lse=False)[0])
    assert replay.agreement == pytest.approx((own == given).float().mean().item()) and replay.agreement < 1
    with pytest.raises(RuntimeError, match="only 1 masks"):
        replay(q, k, v, grid)


@pytest.mark.timeout(900)  # a torch.compile of the tiny blocks with FlexAttention on the CPU: a minute or more
def test_compiled_nabla_is_checked_on_the_reference_masks():
    """The compiled blocks run each visual block on its replayed mask (the i-th call on the i-th mask, under
    torch.compile too): given other masks than the reference's, the compiled output is the eager output on those
    masks, and the agreement it counts is the eager replay's."""
    import torch

    from k5.bench.run import MaskReplay, compiled_on_reference_masks, make_inputs, random_dit, reference_forward, rel_err
    from k5.engine import compile as k5_compile
    from k5.engine.sampling.sampler import model_input
    from k5.kernels.nabla import nabla_backend

    torch.manual_seed(0)
    dit = random_dit(TINY, torch.float32, torch.device("cpu"), 0)
    dit.set_attention("nabla", 0.1)
    grid = flops.latent_grid(512, 512, 9, TINY.patch_size)  # 3 x 4 x 4 tiles
    state, cond, _, t = make_inputs(TINY, grid, 16, torch.device("cpu"), 1)
    x = model_input(state, TINY.visual_cond, None)
    forward = lambda: dit(x, cond.embeds, cond.pooled, t)  # noqa: E731
    with nabla_backend("flex"), torch.no_grad():
        ref, info, masks = reference_forward(dit, forward, keep_masks=True)
        assert len(masks) == TINY.num_visual_blocks and info["density"] < 0.6
        # Other masks for every block: each query tile also on the next key tile (different per block and head).
        other = [m | torch.roll(m, i + 1, -1) for i, m in enumerate(masks)]
        assert all(not torch.equal(a, b) for a, b in zip(masks, other))
        eager = MaskReplay(dit.nabla, list(other))
        local, dit.visual_attention = dit.visual_attention, eager
        try:
            want = forward()
        finally:
            dit.visual_attention = local
        assert rel_err(want, ref) > 1e-3  # the masks matter
        k5_compile.compile_blocks(dit)
        got, agreement = compiled_on_reference_masks(dit, forward, list(other))
    assert rel_err(got, want) <= 1e-5
    assert agreement == pytest.approx(eager.agreement, abs=1e-3) and agreement < 1


def test_gpu_script_plans_its_caps_within_the_call():
    """bash bench/gpu.sh plan: the caps it sums are the ones it prints, and a plan over the call's timeout (or a
    step name it does not know) stops the script before anything runs."""
    import re
    import subprocess

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu.sh"
    run = lambda **env: subprocess.run(["bash", str(script), "plan"], capture_output=True, text=True,  # noqa: E731
                                       env={"PATH": "/usr/bin:/bin", **env}, timeout=60)
    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    caps = {name: int(s) for name, s in re.findall(r"([a-z0-9-]+) (\d+)(?= \+| =)", r.stdout)}
    total = int(re.search(r"= (\d+) s;", r.stdout).group(1))
    assert set(caps) == {"env", "lite-5s-dense", "lite-10s-nabla", "pro-5s-dense", "attention-lite-10s",
                         "host-syncs", "cli-tiny"}
    assert sum(caps.values()) == total
    whole, call = map(int, re.search(r": (\d+) s of the call's (\d+) s", r.stdout).groups())
    assert total < whole <= call == 600
    short = run(CALL_S=str(whole - 1))
    assert short.returncode == 3 and "does not fit" in short.stdout
    one = run(ONLY="pro-5s-dense", CALL_S="200")
    assert one.returncode == 0 and f"= {caps['pro-5s-dense']} s;" in one.stdout
    assert run(ONLY="pro").returncode == 3


def _gpu_smoke(tmp_path, python=sys.executable, **env_vars):
    """bash bench/gpu.sh smoke, reduced (nothing compiled, diffusers treated as absent as on the bare GPU image), from
    a copy of the checkout that nothing installed (``tmp_path/checkout``, made before the call when missing); PYTHON
    is ``python`` unless that is None. Returns (exit status, log, output folder)."""
    import os
    import subprocess

    copy = tmp_path / "checkout"
    if not copy.exists():
        _copy_checkout(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "K5_GPU_SMOKE_REDUCED": "1", "TMPDIR": str(tmp_path), **env_vars}
    env.pop("PYTHONPATH", None)
    env.pop("PYTHON", None)
    if python is not None:
        env["PYTHON"] = python
    r = subprocess.run(["bash", str(copy / "bench" / "gpu.sh"), "smoke"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1700)
    return r.returncode, r.stdout + r.stderr, out


def _copy_checkout(tmp_path) -> Path:
    import shutil

    root = Path(__file__).resolve().parent.parent
    copy = tmp_path / "checkout"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "results", ".whl"))
    return copy


@pytest.mark.timeout(1800)  # eight Python processes; minutes on a loaded 2-core machine
def test_gpu_script_smoke_runs_from_a_plain_copy(tmp_path):
    """bench/gpu.sh smoke, reduced, from a copy of the checkout that nothing installed: every step writes its JSON,
    at most 8 files come back, NABLA is really sparse, the peak is measured and says so, the sync check says it
    measured nothing on a CPU, and a CPU run claims no GPU target."""
    code, log, out = _gpu_smoke(tmp_path)
    copy = tmp_path / "checkout"
    assert code == 0, log[-3000:]
    assert f"k5 from {copy.resolve()}" in log  # the copy's code, not an installed checkout's
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "FAILED" not in log and "SKIPPED" not in log.replace("cli-tiny SKIPPED", ""), log
    assert {"env.json", "lite-5s-dense.json", "lite-10s-nabla.json", "pro-5s-dense.json", "attention-lite-10s.json",
            "host-syncs.json", "summary.md", "gpu-log.txt"} <= set(files), files
    assert "every step finished" in log and "ASSUMED" not in log
    env = json.loads((out / "env.json").read_text())
    assert env["matmul_peak_source"] == "measured" and f"bf16 matrix peak: {env['matmul_peak_tflops_bf16']:.3f}" in log
    for name in ("lite-5s-dense", "lite-10s-nabla", "pro-5s-dense"):
        timing = json.loads((out / f"{name}.json").read_text())["timing"]
        assert timing["peak_source"] == "measured"
        assert timing["peak_tflops_per_device"] == pytest.approx(env["matmul_peak_tflops_bf16"], abs=1e-3)
    syncs = json.loads((out / "host-syncs.json").read_text())
    assert [c["case"] for c in syncs["cases"]] == ["tiny 128x128x5 dense", "tiny 256x256x5 nabla P 0.1",
                                                  "tiny 128x128x5 dense"]
    assert all(c["syncs"].startswith("not measured on CPU") for c in syncs["cases"])
    nabla = json.loads((out / "lite-10s-nabla.json").read_text())["nabla"]
    assert nabla["density"] < 0.6
    for row in json.loads((out / "attention-lite-10s.json").read_text())["nabla"]:
        assert row["density"] < 0.6 and row["rel_err_vs_masked_dense"] <= 1e-5
    summary = (out / "summary.md").read_text()
    assert "No GPU target is evaluated" in summary and "MET" not in summary
    assert "measured in this run" in summary and "syncs in one denoising step | not measured on CPU" in summary


@pytest.mark.timeout(600)
def test_gpu_script_names_a_failed_step_goes_on_and_exits_1(tmp_path):
    """One step made to fail (the copy's matrix-peak measurement raises, so the env step dies before it writes a
    peak): the script still runs the next step, prints the peak as assumed, writes that into summary.md, names the
    failed step in its last lines and exits 1. Only two steps run (ONLY), so this takes seconds, not minutes."""
    copy = _copy_checkout(tmp_path)
    with open(copy / "bench" / "fast.py", "a") as f:
        f.write("\n\ndef matmul_peak_tflops(*args, **kwargs):\n"
                "    raise RuntimeError('broken on purpose by the test')\n")
    code, log, out = _gpu_smoke(tmp_path, ONLY="env host-syncs")
    assert code == 1, log[-3000:]
    assert "!! env FAILED (exit 1)" in log and "broken on purpose by the test" in log
    assert log.rstrip().endswith("!! 1 step(s) failed (an error, a check that did not pass, a timeout or no time "
                                 "left):\n!!   env (exit 1)")
    assert "bf16 matrix peak: ASSUMED 790 TFLOP/s" in log and "env step failed" in log
    assert "host-syncs FAILED" not in log and (out / "host-syncs.json").exists()  # the later step still ran
    assert not (out / "env.json").exists()
    summary = (out / "summary.md").read_text()
    assert "bf16 matrix peak: ASSUMED 790 TFLOP/s" in summary
    assert "Steps that failed or timed out: env (exit 1)." in summary


@pytest.mark.timeout(300)
def test_gpu_script_stops_at_once_when_its_python_has_no_torch(tmp_path):
    """The checkout's .venv python is the default (PYTHON unset); here it is one without torch (site-packages off):
    one line naming the interpreter and the import error, exit 2, no step run."""
    copy = _copy_checkout(tmp_path)
    venv_python = copy / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    venv_python.chmod(0o755)
    code, log, out = _gpu_smoke(tmp_path, python=None)
    assert code == 2, log
    assert f"!! {venv_python} (the checkout's .venv) cannot import torch (ModuleNotFoundError: No module named " \
           f"'torch')" in log
    assert "Traceback" not in log and "== 1." not in log and "== env" not in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu-log.txt"]


def test_summary_labels_figures_from_an_assumed_peak(tmp_path):
    """A DiT run given an assumed peak records it as assumed, and summary.md says so at the peak, at the MFU and at
    the share of the peak a target needs; the same run labelled measured carries no such word."""
    from k5.bench.summary import summarize

    main(["--model", "tiny", "--height", "128", "--width", "128", "--frames", "5", "--vae", "none", "--warmup", "0",
          "--repeat", "1", "--step-repeat", "0", "--threads", "1", "--peak-tflops", "790", "--peak-source", "assumed",
          "--out", str(tmp_path), "--name", "lite-5s-dense", "--json-only"])
    path = tmp_path / "lite-5s-dense.json"
    saved = json.loads(path.read_text())
    assert saved["timing"]["peak_source"] == "assumed" and saved["timing"]["peak_tflops_per_device"] == 790
    text = summarize(tmp_path, smoke=False, peak=790, peak_source="assumed", failed=["env (exit 1)"])
    row = next(line for line in text.splitlines() if line.startswith("| lite-5s-dense forward"))
    assert "bf16 matrix peak: ASSUMED 790 TFLOP/s" in text and "Steps that failed or timed out: env (exit 1)." in text
    assert "of the ASSUMED peak" in row and "of an ASSUMED bf16 peak of 790 TFLOP/s (not measured)" in row
    saved["timing"]["peak_source"] = "measured"
    path.write_text(json.dumps(saved))
    text = summarize(tmp_path, smoke=False, peak=790, peak_source="measured", failed=[])
    row = next(line for line in text.splitlines() if line.startswith("| lite-5s-dense forward"))
    assert "ASSUMED" not in text and "measured in this run" in text and "of the measured bf16 peak (790 TFLOP/s)" in row


def _reads_twice(x):
    a = x.item()  # site A
    return a + x.item()  # site B


def _fake_sync_checker(monkeypatch) -> dict:
    """Stand in for torch's sync checker (CUDA only) on the CPU, doing what torch documents for each mode at
    Tensor.item: raise in "error", warn in "warn". Compiled under a name outside the checkout, as torch's own check
    is (C++: no Python frame of ours). Returns {"now": the mode in force}."""
    import warnings

    import torch

    mode = {"now": "default"}
    fake = {"mode": mode, "item": torch.Tensor.item, "warnings": warnings}
    exec(compile("def checked_item(t):\n"
                 "    if mode['now'] == 'error':\n"
                 "        raise RuntimeError('called a synchronizing CUDA operation')\n"
                 "    if mode['now'] == 'warn':\n"
                 "        warnings.warn('called a synchronizing CUDA operation', UserWarning)\n"
                 "    return item(t)\n", "<torch's sync check>", "exec"), fake)
    monkeypatch.setattr(torch.Tensor, "item", fake["checked_item"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(now=m))
    return mode


def test_sync_check_names_each_sync_by_its_line(monkeypatch):
    """bench/syncs.py's reporting, on the CPU with a stand-in for torch's checker: the first sync is named by the
    line of this file that made it, every sync is counted by line, and an error that is not a sync propagates."""
    import inspect

    import torch

    from k5.bench import syncs

    mode = _fake_sync_checker(monkeypatch)
    _, first = inspect.getsourcelines(_reads_twice)
    here = Path(__file__).resolve().relative_to(syncs.ROOT)
    a = f"{here}:{first + 1} _reads_twice: a = x.item()  # site A"
    b = f"{here}:{first + 2} _reads_twice: return a + x.item()  # site B"
    x = torch.ones(())
    assert syncs.first_sync(lambda: _reads_twice(x)) == a and mode["now"] == "default"
    assert syncs.every_sync(lambda: [_reads_twice(x) for _ in range(3)]) == {a: 3, b: 3}
    assert syncs.first_sync(lambda: x.sum()) is None
    with pytest.raises(RuntimeError, match="not a sync"):
        syncs.first_sync(lambda: (_ for _ in ()).throw(RuntimeError("not a sync")))
    assert mode["now"] == "default"


def test_sync_check_reports_a_sync_planted_in_the_step(tmp_path, monkeypatch):
    """The whole check as a GPU runs it (checker on), on the CPU with the stand-in checker: the tiny model's CFG step
    through the sampler, with and without a sync planted before it. Clean: "none", exit 0. Planted: "found", the
    planted line named first and counted once, exit 1, the JSON written."""
    import inspect

    from k5.bench import syncs

    _fake_sync_checker(monkeypatch)
    monkeypatch.setattr(syncs, "can_check", lambda device: True)
    args = ["--case", "tiny:128x128x5", "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path)]
    assert syncs.main(args) == 0
    clean = json.loads((tmp_path / "host-syncs.json").read_text())
    assert clean["cases"][0]["syncs"] == "none" and clean["verdict"] == "none in 1 case(s) (measured)"

    real = syncs.sample

    def planted(velocity, noise, *a, **k):
        noise.sum().item()  # the planted sync
        return real(velocity, noise, *a, **k)

    monkeypatch.setattr(syncs, "sample", planted)
    assert syncs.main(args) == 1
    row = json.loads((tmp_path / "host-syncs.json").read_text())["cases"][0]
    _, first = inspect.getsourcelines(planted)
    here = Path(__file__).resolve().relative_to(syncs.ROOT)
    where = f"{here}:{first + 1} planted: noise.sum().item()  # the planted sync"
    assert row["syncs"] == "found" and row["first"] == where and row["sites"] == {where: 1}
