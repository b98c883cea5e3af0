"""launch/generate.py with LoRA adapters on the tiny model: ``--lora``, the prompt file's ``lora`` field, switching
between items, tensor parallelism, the manifest, resume, and every bad LoRA input refused before loading.

The adapters are made the way a diffusers user makes them: peft's LoRA on diffusers' Kandinsky5Transformer3DModel
(the tiny checkpoint's own transformer), random non-zero factors on the attention and FFN layers, saved with
``KandinskyLoraLoaderMixin.save_lora_weights``. The oracle of a batch job that switches adapters between items is a
separate run per setting: same process, same threads, fp32, and switching re-reads the base weights, so the weights
are equal bit for bit (test_lora.py); the latents within fp32 rel 1e-5, because a re-read weight keeps the memory
of the one it replaces (a merged weight's own allocation, where a fresh load has a view into the file) and another
layout may take another GEMM path. TP 2 against one process: rel L2 <= 1e-4 (fp32; the sums are split differently).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from k5.engine.checkpoints.lora import sha256_file
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.launch.batch import MANIFEST, read_manifest
from k5.launch.generate import main
from numerics import rel_err
from test_generate import expect_refusal
from test_lora import Boom

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"
SIZES = ["--height", "64", "--width", "64", "--num-frames", "1", "--steps", "2"]
PROMPT, SEED = "a lighthouse in a storm", 5
ATTN_FFN = ["to_query", "to_key", "to_value", "self_attention.out_layer", "cross_attention.out_layer",
            "feed_forward.in_layer", "feed_forward.out_layer"]


def make_lora(folder: Path, seed: int, trigger: str | None = None) -> Path:
    """A diffusers LoRA for the tiny DiT (folder with pytorch_lora_weights.safetensors); with ``trigger``, the
    official LoRAs' header field ``trigger`` is added to the same file."""
    from diffusers import Kandinsky5Transformer3DModel
    from diffusers.loaders import KandinskyLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = Kandinsky5Transformer3DModel.from_pretrained(tiny_checkpoint() / "transformer")
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=ATTN_FFN))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # peft zero-inits B: make every factor matter
                p.copy_(torch.randn_like(p) * 0.3)
    KandinskyLoraLoaderMixin.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    if trigger is not None:
        file = folder / "pytorch_lora_weights.safetensors"
        with safe_open(str(file), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        save_file(tensors, file, metadata={**meta, "trigger": trigger})
    return folder


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(tmp / "a", 1), "b": make_lora(tmp / "b", 2)}


def latents_of(path) -> torch.Tensor:
    return load_file(path)["latents"]


@pytest.fixture(scope="module")
def separate(loras, tmp_path_factory):
    """One run per setting (the oracle): A at scale 1, B at 0.7, no adapter."""
    tmp = tmp_path_factory.mktemp("separate")
    out = {}
    for name, flags in [("a", ["--lora", loras["a"]]), ("b", ["--lora", f"{loras['b']}:0.7"]), ("none", [])]:
        path = tmp / f"{name}.safetensors"
        assert main(["--model", "tiny", "--prompt", PROMPT, "--seed", str(SEED), *SIZES, *map(str, flags),
                     "--save-latents", str(path)]) == 0
        out[name] = latents_of(path)
    # the adapters matter: three different results
    assert rel_err(out["a"], out["none"]) > 0.01 and rel_err(out["b"], out["none"]) > 0.01
    assert rel_err(out["a"], out["b"]) > 0.01
    return out


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_batch_switching_adapters_equals_separate_runs(tmp_path, capsys, loras, separate):
    # A (from --lora), B at 0.7 (relative to the prompt file), none, A again: three switches in one job.
    b = os.path.relpath(loras["b"], tmp_path)
    lines = [{"prompt": PROMPT, "seed": SEED, "output": "a1"},
             {"prompt": PROMPT, "seed": SEED, "output": "b", "lora": f"{b}:0.7"},
             {"prompt": PROMPT, "seed": SEED, "output": "none", "lora": "none"},
             {"prompt": PROMPT, "seed": SEED, "output": "a2", "lora": [str(loras["a"])]}]
    prompts, out = write_jsonl(tmp_path / "prompts.jsonl", lines), tmp_path / "job"
    args = ["--model", "tiny", "--prompts", str(prompts), "--output-dir", str(out), "--lora", str(loras["a"]),
            *SIZES, "--save-latents"]
    assert main(args) == 0
    err = capsys.readouterr().err
    for name, want in [("a1", "a"), ("b", "b"), ("none", "none"), ("a2", "a")]:
        rel = rel_err(latents_of(out / f"{name}.safetensors"), separate[want])
        assert rel <= 1e-5, f"{name}: batch item vs separate run, fp32 rel err {rel:.1e} > 1e-5 (adapters: > 1e-2)"
    # the base weights are re-read at every change (b, none, a2), never for the first item (loaded with A)
    assert err.count("weights re-read from the checkpoint") == 3, err
    # what was merged at load is said once: the adapter, its scale and the Linear weights it changes (the manifest's
    # "layers" below)
    a_file = loras["a"] / "pytorch_lora_weights.safetensors"
    assert err.count("LoRA merged into the DiT") == 1, err
    assert f"LoRA merged into the DiT: {a_file.resolve()} at scale 1 (26 layers)\n" in err, err

    records = {r["output"]: r for r in read_manifest(out / MANIFEST).records}
    a_sha = sha256_file(a_file)
    assert records["a1.mp4"]["lora"] == [{"path": str(a_file.resolve()), "sha256": a_sha, "scale": 1.0, "layers": 26,
                                          "ranks": [4], "config": "header", "trigger": None}]
    assert records["a1.mp4"]["settings"]["lora"] == [{"sha256": a_sha, "scale": 1.0}]
    assert [(x["sha256"], x["scale"]) for x in records["b.mp4"]["lora"]] == [
        (sha256_file(loras["b"] / "pytorch_lora_weights.safetensors"), 0.7)]
    assert "lora" not in records["none.mp4"] and "lora" not in records["none.mp4"]["settings"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(x["path"], x["scale"]) for x in metrics["lora"]] == [(str(a_file.resolve()), 1.0),
                                                                  (records["b.mp4"]["lora"][0]["path"], 0.7)]

    # A resume that asks another scale for a finished item is refused like any other setting, before loading.
    lines[1]["lora"] = f"{b}:0.8"
    write_jsonl(prompts, lines)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "b.mp4 (" in err and "was made with lora" in err and "'scale': 0.7" in err and "'scale': 0.8" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # ... and so is dropping the adapter of a finished item
    lines[1]["lora"] = "none"
    write_jsonl(prompts, lines)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "was made with lora" in capsys.readouterr().err


def test_tensor_parallel_lora_job_equals_one_process(tmp_path, loras, separate):
    """TP 2 under torchrun: --lora for the first item, the base model for the second (every rank switches its own
    slices), each equal to the 1-process run of its setting."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT, "seed": SEED, "output": "a"},
                                                        {"prompt": PROMPT, "seed": SEED, "output": "none",
                                                         "lora": []}])
    out = tmp_path / "job"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(GENERATE), "--model", "tiny", "--prompts", str(prompts), "--output-dir", str(out),
                        "--lora", str(loras["a"]), "--tp-degree", "2", *SIZES, "--save-latents"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tp 2" in r.stderr
    assert rel_err(latents_of(out / "a.safetensors"), separate["a"]) <= 1e-4
    assert rel_err(latents_of(out / "none.safetensors"), separate["none"]) <= 1e-4
    assert [r["layout"]["tp"] for r in read_manifest(out / MANIFEST).records] == [2, 2]


# ---- bad input: one message, exit 2, nothing written, no weight loaded -------------------------------------------

def _lora_file(path: Path, tensors: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


Q = "visual_transformer_blocks.0.self_attention.to_query"


def test_bad_lora_inputs_are_refused_before_loading(capsys, tmp_path, no_loading):
    missing = tmp_path / "nope" / "x.safetensors"
    expect_refusal(capsys, tmp_path, "--lora", missing, match=f"LoRA {missing} does not exist")

    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.safetensors"
    torch.save({"x": Boom(marker)}, evil)
    expect_refusal(capsys, tmp_path, "--lora", evil, match="is a pickle (torch.save) file; pickle files are never "
                                                           "unpickled")
    assert not marker.exists()

    other = _lora_file(tmp_path / "other.safetensors",
                       {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 64),
                        "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(64, 2)})
    expect_refusal(capsys, tmp_path, "--lora", other,
                   match="keys that match no Linear layer of the Kandinsky 5 DiT (is this a LoRA for another model?): "
                         "transformer.blocks.0.attn1.to_q.lora_A.weight")

    wide = _lora_file(tmp_path / "wide.safetensors", {f"transformer.{Q}.lora_A.weight": torch.ones(4, 96),
                                                      f"transformer.{Q}.lora_B.weight": torch.ones(96, 4)})
    expect_refusal(capsys, tmp_path, "--lora", wide, match="the layer's weight is [64, 64]; the LoRA was made for "
                                                           "another model size")
    ranks = _lora_file(tmp_path / "ranks.safetensors", {f"transformer.{Q}.lora_A.weight": torch.ones(4, 64),
                                                        f"transformer.{Q}.lora_B.weight": torch.ones(64, 3)})
    expect_refusal(capsys, tmp_path, "--lora", ranks, match="a LoRA needs A [rank, in] and B [out, rank] with the "
                                                            "same rank")

    good = _lora_file(tmp_path / "good.safetensors", {f"transformer.{Q}.lora_A.weight": torch.ones(4, 64),
                                                      f"transformer.{Q}.lora_B.weight": torch.ones(64, 4)})
    for scale in ("nan", "inf", "-inf"):
        expect_refusal(capsys, tmp_path, "--lora", f"{good}:{scale}", match="is not a finite number")
    expect_refusal(capsys, tmp_path, "--lora", f"{good}:abc", match="scale 'abc' is not a number; use PATH or "
                                                                    "PATH:SCALE")


@pytest.mark.parametrize("value, match", [
    ("missing.safetensors", "prompts.jsonl line 2: LoRA {dir}/missing.safetensors does not exist"),
    ("good.safetensors:nan", "prompts.jsonl line 2: 'lora' good.safetensors:nan: scale nan is not a finite number"),
    (3, "prompts.jsonl line 2: 'lora' must be \"PATH[:SCALE]\", a list of them or \"none\" (no adapter), got 3"),
    ("", "'lora' must be"),
])
def test_bad_lora_field_is_refused_with_its_line(capsys, tmp_path, no_loading, value, match):
    _lora_file(tmp_path / "good.safetensors", {f"transformer.{Q}.lora_A.weight": torch.ones(4, 64),
                                               f"transformer.{Q}.lora_B.weight": torch.ones(64, 4)})
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a cat", "lora": "good.safetensors"},
                                                        {"prompt": "a dog", "lora": value}])
    out = tmp_path / "job"
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompts", str(prompts), "--output-dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and match.format(dir=tmp_path) in err, err
    assert not out.exists()
