"""A Kandinsky 6 batch job on two Ulysses ranks, stopped with SIGTERM part-way and run again: every item exactly
once, the finished files untouched by the rerun, each MP4 with its AAC track, and each item's video and audio
latents the one-process pipeline's for its request (fp32, within 1e-5 relative).

And a data-parallel job (dp 2) with the super-resolution stage: items dealt over the groups, each item's latents the
one-process pipeline's, each MP4 at the SR stage's size with its AAC track.

The stop cannot come too late whatever the machine's load: rank 1 holds after step 1 of item 2 (the fault
injection's gate, tests/faults) until the job is asked to stop, and the test signals once it holds.
"""

import json
import signal
import subprocess

import torch
from safetensors.torch import load_file

from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
from k5.engine.pipelines.k6 import Kandinsky6Pipeline
from k5.engine.pipelines.video import Request
from k5.launch.batch import MANIFEST, read_manifest
from numerics import rel_err
from test_batch import ROOT, finished_files, signal_everything, start, torchrun, wait_for_mark
from test_k6_generate import assert_av
from faults.k5_faults import child_env

ITEMS = 4
SIZES = ["--height", "64", "--width", "64", "--num-frames", "5", "--steps", "2"]


def test_k6_batch_stops_and_resumes_with_audio(tmp_path):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "job"
    prompts.write_text("".join(json.dumps({"prompt": f"a dog barks, take {i}"}) + "\n" for i in range(ITEMS)))
    cmd = torchrun("--model", "tiny-k6-distill", "--prompts", str(prompts), "--output-dir", str(out), *SIZES,
                   "--ulysses-degree", "2", "--save-latents", "--timeout", "60", "--seed", "11")
    mark = tmp_path / "holding"
    proc = start(cmd, tmp_path, "first", child_env(f"rank=1,item=2,step=1,mode=gate,mark={mark}"))
    wait_for_mark(mark, proc)
    signal_everything(proc, signal.SIGTERM)
    assert proc.wait(60) != 0
    before = finished_files(out)
    assert len(read_manifest(out / MANIFEST).records) == 2  # items 0 and 1; item 2 was held, never published

    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{ITEMS - 2} of {ITEMS} item(s) to do (2 finished before)" in rerun.stderr
    records = {r["item"]: r for r in read_manifest(out / MANIFEST).records}
    assert sorted(records) == list(range(ITEMS))  # each item exactly once
    after = finished_files(out)
    assert all(after[name] == kept for name, kept in before.items())  # the rerun touched no finished file
    pipe = Kandinsky6Pipeline.from_pretrained(k6_tiny_checkpoint(kind="distill"), torch.float32)
    for i, r in records.items():
        assert r["settings"]["audio"] is True and r["files"]["video"]["checked"]["audio"]["codec"] == "aac"
        assert_av(out / r["files"]["video"]["name"], 5)
        saved = load_file(out / r["files"]["latents"]["name"])
        want = pipe.generate(Request(f"a dog barks, take {i}", height=64, width=64, num_frames=5, steps=2,
                                     guidance_scale=1.0, seed=11 + i))
        assert rel_err(saved["latents"], want.latents) < 1e-5 and rel_err(saved["audio_latents"], want.audio) < 1e-5



def test_k6_batch_data_parallel_with_upscale(tmp_path):
    """dp 2: the items dealt over two one-rank groups, each MP4 with its AAC track at the SR stage's size, each
    item's latents the one-process pipeline's."""
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "job"
    prompts.write_text("".join(json.dumps({"prompt": f"a bell rings, take {i}"}) + "\n" for i in range(2)))
    cmd = torchrun("--model", "tiny-k6-distill", "--prompts", str(prompts), "--output-dir", str(out),
                   "--height", "64", "--width", "128", "--num-frames", "5", "--steps", "2", "--dp-degree", "2",
                   "--upscale", "1080p", "--save-latents", "--timeout", "60", "--seed", "2")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = {r["item"]: r for r in read_manifest(out / MANIFEST).records}
    assert sorted(records) == [0, 1] and {r["layout"]["dp_group"] for r in records.values()} == {0, 1}
    pipe = Kandinsky6Pipeline.from_pretrained(k6_tiny_checkpoint(kind="distill"), torch.float32)
    for i, rec in records.items():
        assert rec["settings"]["upscale"] == "1080p"
        video = rec["files"]["video"]["checked"]
        assert (video["width"], video["height"]) == (288, 128) and video["audio"]["codec"] == "aac"
        saved = load_file(out / rec["files"]["latents"]["name"])
        want = pipe.generate(Request(f"a bell rings, take {i}", height=64, width=128, num_frames=5, steps=2,
                                     guidance_scale=1.0, seed=2 + i))
        assert rel_err(saved["latents"], want.latents) < 1e-5 and rel_err(saved["audio_latents"], want.audio) < 1e-5
