"""`python -m k5.bench mask` at a small shape: it times every part of the mask build and the attention, and checks
the tile indices against the stable argsort they replaced (the bench itself raises if they differ). Times are not
checked beyond being positive and ordered."""

import json

import pytest

from k5.bench.mask import main


def test_mask_bench_times_the_build_and_the_attention(tmp_path, capsys):
    # 256x512, 17 frames: 5 x 2 x 4 = 40 tiles; P 0.3 keeps a part of them
    r = main(["--height", "256", "--width", "512", "--frames", "17", "--P", "0.3", "--repeat", "2", "--threads", "1",
              "--device", "cpu", "--out", str(tmp_path), "--name", "smoke"])
    assert r["config"]["tiles"] == 40 and r["config"]["head_dim"] == 128 and 0 < r["config"]["density"] < 1
    assert r["checks"] == {"tile_indices_equal_stable_argsort": True, "tile_counts_equal_mask_sums": True}
    saved = json.loads((tmp_path / "smoke.json").read_text())
    for clock in ("wall_s", "cpu_s"):
        for part in ("mask_build", "pool", "top_cdf_and_sta", "tile_indices", "attention"):
            s = saved[clock][part]
            assert 0 <= s["min"] <= s["median"] <= s["max"], (clock, part)
        assert saved[f"mask_build_over_attention_{clock[:-2]}"] > 0
    assert "mask build / attention" in capsys.readouterr().out


def test_mask_bench_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--height", "192", "--width", "256", "--frames", "5", "--no-save"])
    assert e.value.code == 2 and "multiples of 128" in capsys.readouterr().err
