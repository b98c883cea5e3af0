"""The Kandinsky 6 catalogue (engine/catalogue/k6_variants.py) against the facts written out here from its sources
(FastVideo's kandinsky6_ti2va.md registry table; diffusers 0.42.1's Kandinsky6TI2VAPipeline defaults; the issue), the
recommended 8-GPU layouts (k5.launch.k6) against the model's heads and parallel.memory's estimate, and resolve: a folder named like a
released repo takes its settings."""

import shutil

import pytest

from k5.engine.catalogue import k6_variants
from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.engine.catalogue.resolve import resolve_model
from k5.engine.catalogue.variants import VariantError
from k5.launch import k6 as k6_layouts

# repo: (scheduler, steps, guidance), as FastVideo's table gives them
FACTS = {
    "kandinskylab/Kandinsky-6.0-Pro-5s-Diffusers": ("euler", 50, 5.0),
    "kandinskylab/Kandinsky-6.0-Pro-distill-5s-Diffusers": ("piflow", 10, 1.0),
    "kandinskylab/Kandinsky-6.0-Lite-5s-Diffusers": ("euler", 50, 5.0),
    "kandinskylab/Kandinsky-6.0-Lite-distill-5s-Diffusers": ("piflow", 10, 1.0),
    "kandinskylab/Kandinsky-6.0-VSR-distilled2steps-5s-Diffusers": ("piflow", 2, 1.0),
}


def test_rows_are_the_sources_settings():
    rows = {v.repo: v for v in k6_variants.K6_VARIANTS.values()}
    assert set(rows) == set(FACTS)
    for repo, (scheduler, steps, guidance) in FACTS.items():
        v = rows[repo]
        assert (v.scheduler, v.steps, v.guidance_scale) == (scheduler, steps, guidance)
        if v.task == "t2av":  # diffusers' __call__ defaults: 512x768, 121 frames
            assert (v.height, v.width, v.num_frames) == (512, 768, 121) and v.attention == "dense"
            assert v.config().n_grid == (10 if scheduler == "piflow" else 1)
    assert k6_variants.recognise("models--kandinskylab--Kandinsky-6.0-Lite-5s-Diffusers").name == "k6-lite-5s"
    assert k6_variants.recognise("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers") is None
    with pytest.raises(VariantError, match="k6-pro-5s"):
        k6_variants.get("k6-pro-5")


@pytest.mark.parametrize("name", ["k6-pro-5s", "k6-pro-distill-5s", "k6-lite-5s", "k6-lite-distill-5s"])
def test_recommended_layout_fits(name):
    v = k6_variants.get(name)
    lay = k6_layouts.recommended_layout(v, 8)
    assert lay["dp"] * lay["cfg"] * lay["ulysses"] * lay["ring"] * lay["tp"] == 8
    assert (v.config().num_heads // lay["tp"]) % lay["ulysses"] == 0
    assert lay["cfg"] == (2 if v.guidance_scale != 1.0 else 1)
    assert k6_layouts.memory_per_gpu(v, 8)["peak"] <= k6_layouts.FIT_GIB
    # Pro needs tp 2: with tp 1 its estimate is over what an 80 GB GPU leaves (DiT and text encoders together)
    if v.family == "pro":
        assert lay["tp"] == 2 and k6_layouts._estimate(v, k6_layouts._layout(v, 8, 1))["peak"] > k6_layouts.FIT_GIB


def test_a_folder_named_like_a_release_takes_its_settings(tmp_path):
    folder = tmp_path / "Kandinsky-6.0-Lite-distill-5s-Diffusers"
    shutil.copytree(k6_tiny_checkpoint(kind="distill"), folder)
    r = resolve_model(str(folder))
    assert r.k6 and r.task == "t2av"
    assert r.defaults() == {"steps": 10, "guidance_scale": 1.0, "shift": None, "height": 512, "width": 768,
                            "num_frames": 121}
    with pytest.raises(VariantError, match="drop --variant"):
        resolve_model(str(folder), "t2v-lite-sft-5s")


def test_readme_table_is_the_catalogues():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = "<!-- k6 table: k5 variants (Kandinsky 6 part) -->\n"
    table = readme[readme.index(start) + len(start): readme.index("\n<!-- end of k6 table -->")]
    assert table == k6_layouts.markdown()
