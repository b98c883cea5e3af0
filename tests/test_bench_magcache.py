"""`python -m k5.bench magcache` on the tiny DiT with the Lite sft 5 s preset: the forwards it reports run and
skipped equal the reference rule (test_magcache.reference_skips, written from magcache_utils.py) and the model's
own hook counts; the result file holds min / median / max seconds per video of each mode. Times are not checked
beyond being positive and ordered."""

import json
import re

from k5.bench.magcache import main
from k5.engine.catalogue.variants import get
from test_magcache import reference_skips


def test_magcache_bench_counts_the_reference_forwards(tmp_path, capsys):
    r = main(["--model", "tiny", "--height", "64", "--width", "64", "--frames", "5", "--text-tokens", "8",
              "--repeat", "1", "--threads", "1", "--out", str(tmp_path), "--name", "smoke"])
    v = get("t2v-lite-sft-5s")
    want = reference_skips(v.mag_ratios, 50, no_cfg=False)
    f = r["forwards"]
    assert {tuple(s) for s in f["skipped"]} == want and f["skipped_with"] == len(want) == 52
    assert (f["per_video_without"], f["run_with"]) == (100, 48)
    assert f["counted_without"] == {"dit_calls": 100, "visual_stack_runs": 100}
    assert f["counted_with"] == {"dit_calls": 100, "visual_stack_runs": 48}  # skipped forwards still call the DiT
    assert r["checks"]["hook_counts_equal_the_plan"] is True
    assert 0 < r["latents_rel_diff_on_vs_off"] < 1  # skipping changes the latents, on random weights by this much
    saved = json.loads((tmp_path / "smoke.json").read_text())
    for kind in ("seconds_per_video", "cpu_seconds_per_video"):
        for mode in ("without", "with"):
            s = saved[kind][mode]
            assert 0 < s["min"] <= s["median"] <= s["max"] and len(s["runs"]) == 1
    assert saved["config"]["steps"] == 50 and saved["config"]["guidance_scale"] == 5.0
    out, err = capsys.readouterr()
    assert "DiT forwards 100 -> 48 (52 skipped)" in out
    # progress on stderr: what runs, then a line per video as it ends (1 untimed of each mode, then --repeat 1 each)
    assert err.startswith("bench magcache: t2v-lite-sft-5s, 50 steps, tiny widths at 64x64x5 on cpu: 4 videos of "
                          "100 DiT forwards without MagCache and 48 with it"), err
    assert re.findall(r"^bench magcache: video (\d)/4 \((\w+) MagCache(, untimed)?\) in [\d.]+ s$", err, re.M) == [
        ("1", "without", ", untimed"), ("2", "with", ", untimed"), ("3", "without", ""), ("4", "with", "")], err


def test_magcache_bench_refuses_a_variant_without_ratios(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--variant", "t2v-lite-distilled16steps-5s", "--no-save"])
    assert e.value.code == 2
    assert "t2v-lite-distilled16steps-5s has no MagCache ratios" in capsys.readouterr().err
