"""bench/k6_projection.py: its FLOP count against torch's FlopCounterMode on the tiny-k6 DiT, and the command's
output (labelled a projection, one row per GPU count and checkpoint, the recommended 8-GPU layout)."""

import json

import pytest

import torch
from torch.utils.flop_counter import FlopCounterMode

from k5.bench.k6_projection import forward_flops, main
from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.engine.checkpoints.dit import load_k6_dit


def test_linear_flops_equal_the_flop_counters():
    """Every Linear of the fused blocks and both text branches (modulation left out, as the model says), counted by
    torch on a real forward with video, audio and text of unequal lengths: equal to the model's linear FLOPs. (The
    attention products run in our kernels, which the counter does not see.)"""
    dit = load_k6_dit(k6_tiny_checkpoint(kind="sft"), torch.float32)
    cfg = dit.config
    Sa, St = 9, 6
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        dit(torch.randn(1, 3, 16, 24, cfg.in_channels), torch.randn(1, Sa, cfg.in_audio_dim),
            torch.randn(1, St, cfg.in_text_dim), torch.randn(1, cfg.in_text_dim2), torch.tensor([500.0]))
    counts = counter.get_flop_counts()
    counted = sum(sum(counts.get(f"Kandinsky6DiT.{name}", {}).values()) for name, m in dit.named_modules()
                  if isinstance(m, torch.nn.Linear) and "blocks." in name and "modulation" not in name)
    assert counted > 0 and counted == forward_flops(cfg, 3 * 8 * 12, Sa, St).linear


def test_projection_command(tmp_path):
    result = main(["--gpus", "1", "8", "--out", str(tmp_path)])
    assert result["kind"] == "PROJECTION, not a measurement"
    md = (tmp_path / "projection-k6-pro.md").read_text()
    assert "PROJECTION, not a measurement" in md and "ASSUMED" in md
    rows = json.loads((tmp_path / "projection-k6-pro.json").read_text())["rows"]
    one = {r["checkpoint"]: r for r in rows if r["gpus"] == 1}
    eight = {r["checkpoint"]: r for r in rows if r["gpus"] == 8}
    assert set(eight) == {"sft", "distill", "sft (recommended layout)", "distill (recommended layout)"}
    for name in ("sft", "distill"):
        assert 0 < eight[name]["efficiency"] <= 1.0
        assert eight[name]["efficiency"] == one[name]["s_per_video"] / (8 * eight[name]["s_per_video"])
    assert one["sft"]["s_per_video"] == pytest.approx(10 * one["distill"]["s_per_video"])  # 50 x 2 forwards vs 10 x 1


def test_k6_bench_times_both_streams(tmp_path):
    from k5.bench import k6

    result = k6.main(["--model", "tiny-k6", "--height", "64", "--width", "64", "--frames", "5", "--repeat", "1",
                      "--out", str(tmp_path)])
    c = result["config"]
    assert (c["video_tokens"], c["audio_tokens"], c["layout"]) == (2 * 4 * 4, 9, "single")  # 5 frames at 24 fps
    want = forward_flops(k6.model_config("tiny-k6", None), 32, 9, 64).total / 1e12
    assert result["flops"]["tflop_per_forward"] == want and result["timing"]["s_per_step"] > 0
    assert (tmp_path / f"{result['name']}.json").is_file()
    with pytest.raises(SystemExit):  # a layout needs torchrun
        k6.main(["--ulysses", "2", "--out", str(tmp_path)])
