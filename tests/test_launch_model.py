"""launch/model.py: flag > variant > built-in defaults, the MagCache ratios a run gets, the forwards of an item."""

import argparse

import pytest

from k5.engine.catalogue import variants as V
from k5.engine.pipelines.video import Request
from k5.engine.catalogue.resolve import resolve_model
from k5.launch import model
from test_magcache import reference_skips


def flags(**given):
    base = dict(model="tiny", variant=None, components=None, magcache=False, attention="auto",
                **{k: None for k in model.REQUEST_DEFAULTS})
    return argparse.Namespace(**{**base, **given})


def test_flags_override_the_variant_which_overrides_the_built_in():
    args = flags(variant="t2v-lite-distilled16steps-5s", steps=3)
    out = model.request_defaults(args, resolve_model("tiny", args.variant))
    # steps from the flag, guidance and shift from the variant, the size the tiny model's own
    assert out == {"height": 128, "width": 128, "num_frames": 9, "steps": 3, "guidance_scale": 1.0, "shift": 5.0}
    assert (args.steps, args.guidance_scale) == (3, 1.0)
    args = flags()
    out = model.request_defaults(args, resolve_model("tiny"))
    assert out == {"height": 128, "width": 128, "num_frames": 9, "steps": 4, "guidance_scale": 5.0, "shift": None}


def test_magcache_ratios_or_a_message():
    args = flags(magcache=True, variant="t2v-lite-nocfg-5s")
    assert model.magcache_ratios(args, resolve_model("tiny", args.variant)) == V.get("t2v-lite-nocfg-5s").mag_ratios
    assert model.magcache_ratios(flags(variant="t2v-lite-nocfg-5s"), resolve_model("tiny", "t2v-lite-nocfg-5s")) is None
    with pytest.raises(V.VariantError, match="t2v-lite-distilled16steps-5s has no MagCache ratios.*drop --magcache"):
        model.magcache_ratios(flags(magcache=True), resolve_model("tiny", "t2v-lite-distilled16steps-5s"))
    with pytest.raises(ValueError, match="--magcache needs the variant's calibrated ratios.*--variant "
                                         r"\(t2v-lite-sft-5s, t2v-lite-sft-10s"):
        model.magcache_ratios(flags(magcache=True), resolve_model("tiny"))


def test_forwards_of_an_item_follow_the_reference_rule():
    ratios = V.get("t2v-lite-sft-5s").mag_ratios
    f = model.forwards(ratios, Request("x", steps=30, guidance_scale=5.0))
    assert {tuple(s) for s in f["skipped"]} == reference_skips(ratios, 30, no_cfg=False)
    assert f["run"] + len(f["skipped"]) == 60
    nocfg = V.get("t2v-lite-nocfg-5s").mag_ratios
    f = model.forwards(nocfg, Request("x", steps=50, guidance_scale=1.0))
    assert {tuple(s) for s in f["skipped"]} == reference_skips(nocfg, 50, no_cfg=True)
    assert {b for _, b in f["skipped"]} == {"cond"} and f["run"] + len(f["skipped"]) == 50
    assert model.forwards(None, Request("x", steps=7, guidance_scale=5.0)) == {"run": 14, "skipped": []}
