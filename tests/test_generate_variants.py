"""launch/generate.py with --model as a repo id, --variant, --list-variants and --magcache, on the tiny model.

- Off: without --magcache the latents are bit-identical to the sampler loop as it was before the step chain,
  written out here (test_magcache.old_sample) on the same text embeddings and noise, fp32; the run names its
  model by a repo id from a fake Hugging Face cache (HF_HUB_CACHE) and records the repo and its revision.
- On: --magcache (the Lite sft 5 s ratios, 10 steps) gives the same latents in 1 process and under CFG parallel x
  Ulysses 2 on 4 processes (fp32, relative L2 <= 1e-4); the manifest lists the skipped forwards, which equal the
  reference rule (test_magcache.reference_skips) and the visual-block runs the hooks measured.
- Bad input: one message, exit code 2, no weight loaded, nothing written.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k5.engine.catalogue import variants as V
from k5.engine.model.config import PRESETS
from k5.engine.pipelines.video import Kandinsky5Pipeline, rope_scale
from k5.engine.sampling.sampler import initial_noise
from k5.engine.encoders.text import DEFAULT_NEGATIVE_PROMPT
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.launch.generate import main
from numerics import rel_err
from test_magcache import old_sample, reference_skips
from test_resolve import sparse_safetensors

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"
PROMPT = "a lighthouse in a storm"
COMMIT = "c0ffee" + "0" * 34


def run_cli(*args, nproc=1, env=None):
    """launch/generate.py in one process; on several, torchrun -m k5 generate (the k5 command's module form)."""
    if nproc == 1:
        command = [sys.executable, str(GENERATE)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "k5", "generate"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]


def fake_hub(tmp_path, repo: str, transformer=None) -> Path:
    """A Hugging Face cache holding ``repo`` as the tiny checkpoint (its files linked), optionally with another
    transformer/ folder."""
    hub = tmp_path / "hub"
    base = hub / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for entry in tiny_checkpoint().iterdir():
        if not (transformer is not None and entry.name == "transformer"):
            (snap / entry.name).symlink_to(entry)
    if transformer is not None:
        (snap / "transformer").symlink_to(transformer)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    return hub


def old_path_latents(height, width, frames, steps, guidance, seed) -> torch.Tensor:
    """The pipeline's pieces (text, noise, DiT) driven by the pre-chain sampler loop (its shift: 5, the tiny
    checkpoint's scheduler config and the default), fp32."""
    pipe = Kandinsky5Pipeline.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    assert pipe.default_shift == 5.0
    (cond, uncond), _ = pipe.encode([PROMPT, DEFAULT_NEGATIVE_PROMPT])
    noise = initial_noise((1, (frames - 1) // 4 + 1, height // 8, width // 8, 16), seed)
    sf = rope_scale(height, width)
    velocity = lambda inp, t, c: pipe.dit(inp, c.embeds, c.pooled, t, scale_factor=sf, text_mask=c.mask)  # noqa
    with torch.inference_mode():
        return old_sample(velocity, noise, cond, uncond, steps, guidance)


def test_without_magcache_latents_are_bit_identical_to_before(tmp_path):
    import os

    repo = "someone/k5-tiny-finetune"  # no catalogue variant: the built-in defaults and the flags (prompt expansion,
    # on by default for a real model, off: the prompt is encoded as given)
    # Bitwise needs the same computation: the same checkpoint files (so the same weight layout) and, with
    # OMP_NUM_THREADS, the one intra-op thread of this process (conftest), so that no kernel splits its work otherwise.
    env = {**os.environ, "HF_HUB_CACHE": str(fake_hub(tmp_path, repo)), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "job"
    r = run_cli("--model", repo, "--prompt", PROMPT, "--height", 64, "--width", 96, "--num-frames", 5, "--steps", 3,
                "--seed", 2, "--dtype", "fp32", "--no-expand-prompt", "--output-dir", out, "--save-latents", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(out / "00000.safetensors")["latents"]
    want = old_path_latents(64, 96, 5, 3, 5.0, 2)  # guidance 5 and shift 5: the defaults
    assert torch.equal(got, want)
    (rec,) = records(out)
    assert rec["checkpoint"]["model"] == f"{repo}@{COMMIT}"
    assert (rec["checkpoint"]["repo"], rec["checkpoint"]["revision"]) == (repo, COMMIT)
    assert (rec["checkpoint"]["variant"], rec["checkpoint"]["magcache"]) == (None, False)
    assert rec["dit_forwards"] == {"run": 6, "skipped": []}


def test_variant_settings_are_the_defaults_and_flags_override_them(tmp_path):
    out = tmp_path / "job"
    r = run_cli("--model", "tiny", "--variant", "t2v-lite-distilled16steps-5s", "--steps", 2, "--prompt", PROMPT,
                "--output-dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = records(out)
    req = rec["settings"]["request"]
    # From the variant: guidance 1 (no unconditional pass) and shift 5; from the flag: 2 steps (the variant's 16);
    # the tiny model's own size.
    assert (req["guidance_scale"], req["shift"], req["steps"]) == (1.0, 5.0, 2)
    assert (req["height"], req["width"], req["num_frames"]) == (128, 128, 9)
    assert rec["settings"]["variant"] == "t2v-lite-distilled16steps-5s"
    assert (rec["checkpoint"]["variant"], rec["checkpoint"]["variant_from"]) == ("t2v-lite-distilled16steps-5s",
                                                                                 "given")
    assert rec["dit_forwards"] == {"run": 2, "skipped": []}
    assert "variant t2v-lite-distilled16steps-5s, DiT forwards 2 run, 0 skipped" in r.stderr
    # A resume that asks for another variant is refused (it would mix settings).
    again = run_cli("--model", "tiny", "--variant", "t2v-lite-nocfg-5s", "--steps", 2, "--prompt", PROMPT,
                    "--output-dir", out)
    assert again.returncode == 2 and "variant 't2v-lite-distilled16steps-5s' (this run: 't2v-lite-nocfg-5s')" in \
        again.stderr


MAGCACHE = ["--model", "tiny", "--variant", "t2v-lite-sft-5s", "--magcache", "--steps", 10, "--prompt", PROMPT,
            "--height", 64, "--width", 96, "--num-frames", 5, "--seed", 3, "--save-latents"]


def test_magcache_one_process_and_cfg_parallel_x_ulysses_agree(tmp_path):
    ratios = V.get("t2v-lite-sft-5s").mag_ratios
    want = reference_skips(ratios, 10, no_cfg=False)
    runs = {}
    for name, nproc, flags in (("single", 1, []), ("cfg-ulysses", 4, ["--cfg-parallel", "--ulysses-degree", 2])):
        out = tmp_path / name
        r = run_cli(*MAGCACHE, "--output-dir", out, "--metrics-json", tmp_path / f"{name}.json", *flags, nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        (rec,) = records(out)
        metrics = json.loads((tmp_path / f"{name}.json").read_text())
        runs[name] = (load_file(out / "00000.safetensors")["latents"], rec, metrics, r.stderr)
    for name, (latents, rec, metrics, log) in runs.items():
        skipped = {tuple(s) for s in rec["dit_forwards"]["skipped"]}
        assert skipped == want and len(want) == 10, name  # the reference rule, written out independently
        assert rec["dit_forwards"]["run"] == 20 - len(want)
        assert rec["checkpoint"]["magcache"] is True and rec["settings"]["step_cache"] == "magcache"
        assert metrics["variant"] == "t2v-lite-sft-5s" and metrics["magcache"] is True
        assert metrics["dit_forwards"] == {"run": 10, "skipped": 10}
        assert "DiT forwards 10 run, 10 skipped (MagCache)" in log
    # Measured by a hook on the first visual block of the writing rank: all 10 forwards that ran in one process;
    # under CFG parallel that rank runs the conditional branch only, 5 of them.
    assert runs["single"][2]["per_item"][0]["visual_stack_runs_on_rank"] == 10
    assert runs["cfg-ulysses"][2]["per_item"][0]["visual_stack_runs_on_rank"] == 10 - len(
        [s for s in want if s[1] == "cond"])
    assert rel_err(runs["cfg-ulysses"][0], runs["single"][0]) <= 1e-4


# ---- bad input: one message, exit 2, no weight loaded, nothing written ------------------------------------------


def refused(capsys, tmp_path, *args, match):
    out = tmp_path / "never.mp4"
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "a cat", "--output", str(out), *map(str, args)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and match in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    return err


@pytest.mark.parametrize("args, match", [
    (["--model", "tiny", "--variant", "t2v-lite-sft"],
     "unknown variant 't2v-lite-sft'; did you mean t2i-lite-sft, t2v-lite-sft-5s, t2v-lite-sft-10s?"),
    (["--model", "tiny", "--variant", "t2v-lite-distilled16steps-5s", "--magcache"],
     "variant t2v-lite-distilled16steps-5s has no MagCache ratios in the reference configs"),
    (["--model", "tiny", "--magcache"], "--magcache needs the variant's calibrated ratios, and --model tiny is no "
                                        "catalogue variant: name one with --variant (t2v-lite-sft-5s"),
    (["--model", "tiny", "--variant", "t2i-lite-sft"], "t2i-lite-sft is a t2i model; the tiny model --model tiny runs "
                                                       "t2v/i2v: use one of t2v-lite-sft-5s"),
])
def test_bad_variant_or_magcache(capsys, tmp_path, no_loading, args, match):
    refused(capsys, tmp_path, *args, match=match)


def test_repo_missing_from_the_cache_names_the_download(capsys, tmp_path, no_loading, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    refused(capsys, tmp_path, "--model", "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers",
            match="not in the Hugging Face cache {} (nothing is downloaded at run time); download it first: hf "
                  "download kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers".format(tmp_path / "empty-hub"))


def test_pro_variant_on_lite_weights(capsys, tmp_path, no_loading, monkeypatch):
    """A Lite-shaped transformer (a real safetensors header over a sparse hole, the Lite config) in a repo of the
    cache; the other components are the tiny model's, so every up-front check passes until the variant's."""
    lite = tmp_path / "lite-transformer"
    sparse_safetensors(lite / "diffusion_pytorch_model.safetensors", PRESETS["lite"])
    (lite / "config.json").write_text(json.dumps(PRESETS["lite"].to_dict()))
    repo = "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub(tmp_path, repo, transformer=lite)))
    refused(capsys, tmp_path, "--model", repo, "--variant", "t2v-pro-sft-5s-hd",
            match=f"variant t2v-pro-sft-5s-hd is for Kandinsky 5 pro weights (model_dim 4096, 60 visual blocks, 32 "
                  f"heads of 128), but --model {repo} has lite weights (model_dim 1792, 32 visual blocks, 28 heads of "
                  f"64); variants for these weights: t2v-lite-sft-5s")


def test_list_variants(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--list-variants"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["variant", "task", "steps", "guidance", "attention", "size", "MagCache",
                                           "layout", "GiB/GPU"]
    assert sum(line.split()[0] in V.VARIANTS for line in out.splitlines() if line.strip()) == len(V.VARIANTS)
