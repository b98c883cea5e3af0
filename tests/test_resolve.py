"""Model resolution: repo ids from a fake local Hugging Face cache, single files with a variant, the errors.

Checkpoints of the released shapes are written as sparse safetensors files: a real header with every tensor of
the Lite DiT (names, dtypes, shapes) and a hole for the data, so a 2B model costs no disk and resolution reads
exactly what it reads from a real one (headers and JSON, never a weight).
"""

import json
import re
import shutil
import struct

import pytest
import torch

from k5.engine.catalogue import variants as V
from k5.engine.checkpoints.dit import keeps_fp32
from k5.engine.model.config import PRESETS
from k5.engine.model.dit import Kandinsky5DiT
from k5.engine.catalogue.resolve import OTHER_COMPONENTS, ResolveError, hub_cache, resolve_model, tiny_variant
from k5.kernels.nabla import NablaSpec
from k5.engine.checkpoints.dit import load_dit
from numerics import rel_err
from test_sharded_load import CFG, build_model, write_checkpoint

LITE_DIFFUSERS = "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-10s-Diffusers"
LITE_ORIGINAL = "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-10s"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sparse_safetensors(path, cfg):
    """A safetensors file with the header of ``cfg``'s DiT and no data on disk (a sparse hole)."""
    with torch.device("meta"):
        model = Kandinsky5DiT(cfg)
    header, offset = {}, 0
    for name, p in model.named_parameters():
        dtype, size = ("F32", 4) if keeps_fp32(name) else ("BF16", 2)
        header[name] = {"dtype": dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.numel() * size]}
        offset += p.numel() * size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def cache_repo(hub, repo, files: dict, commit=COMMIT, ref="main"):
    """A repo in the hub cache layout: blobs, snapshots/<commit>/<path> -> ../blobs/<name>, refs/<ref>."""
    base = hub / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    for rel, make in files.items():
        blob = base / "blobs" / rel.replace("/", "_")
        blob.parent.mkdir(parents=True, exist_ok=True)
        make(blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / ref).write_text(commit)
    return snap


def text(content):
    return lambda p: p.write_text(content)


def diffusers_files(cfg):
    """What resolution looks at in a -Diffusers repo: the transformer (sparse) and the component folders."""
    config = {**cfg.to_dict(), "attention_type": "regular"}  # the folder's own config: dense
    return {
        "model_index.json": text("{}"),
        "transformer/config.json": text(json.dumps(config)),
        "transformer/diffusion_pytorch_model.safetensors": lambda p: sparse_safetensors(p, cfg),
        **{f"{c}/config.json": text("{}") for c in OTHER_COMPONENTS},
    }


def make_components(tmp_path):
    for c in OTHER_COMPONENTS:
        (tmp_path / "components" / c).mkdir(parents=True)
    return tmp_path / "components"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_cache_follows_the_environment(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert hub_cache() == tmp_path / "hc"
    assert hub_cache(tmp_path / "given") == tmp_path / "given"


def test_repo_id_resolves_from_the_cache(hub):
    snap = cache_repo(hub, LITE_DIFFUSERS, diffusers_files(PRESETS["lite"]))
    r = resolve_model(LITE_DIFFUSERS)
    assert (r.kind, r.root, r.dit, r.repo, r.revision) == ("folder", snap, snap, LITE_DIFFUSERS, COMMIT)
    assert (r.variant.name, r.variant_from) == ("t2v-lite-sft-10s", "recognised")
    # The folder's config says dense; the 10 s variant's NABLA settings are what the authors run it with.
    assert (r.config.attention_type, r.config.attention_P, r.config.attention_wT) == ("nabla", 0.9, 11)
    assert r.describe()["variant"] == "t2v-lite-sft-10s"


def test_repo_revision_and_given_variant(hub):
    cache_repo(hub, LITE_DIFFUSERS, diffusers_files(PRESETS["lite"]), commit="f" * 40, ref="v1")
    r = resolve_model(LITE_DIFFUSERS + "@v1", "t2v-lite-nocfg-10s")
    assert (r.revision, r.variant.name, r.variant_from) == ("f" * 40, "t2v-lite-nocfg-10s", "given")


def test_missing_repo_names_the_download_command(hub):
    with pytest.raises(ResolveError, match=r"not in the Hugging Face cache .*hub.*hf download "
                                           r"kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers.*"
                                           r"huggingface-cli download kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s"):
        resolve_model("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers")


@pytest.mark.parametrize("typo, want", [
    ("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffuser", "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"),
    ("kandinksylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers", "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"),
    ("kandinskylab/kandinsky-5.0-i2i-lite-sft-diffusers@main", "kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers"),
])
def test_a_mistyped_repo_id_names_the_closest_catalogue_repos(hub, typo, want):
    with pytest.raises(ResolveError) as e:
        resolve_model(typo)
    message = str(e.value)
    assert f"did you mean {want}" in message
    # the download command names the catalogue repo, never the typo (hf, and older huggingface-cli)
    assert re.findall(r"download ([^\s)]+)", message) == [want, want], message
    if typo.lower() == typo:  # only the case differed: that one repo, no other guesses
        assert f"did you mean {want}?" in message


def test_a_repo_unlike_the_catalogue_still_names_its_own_download(hub):
    with pytest.raises(ResolveError) as e:
        resolve_model("someone/my-video-finetune")
    message = str(e.value)
    assert "did you mean" not in message and "hf download someone/my-video-finetune " in message


def test_a_mistyped_tiny_model(hub):
    with pytest.raises(ResolveError, match="--model tiny-imag: .*did you mean tiny-image\\? .*tiny or tiny-image"):
        resolve_model("tiny-imag")


def test_not_a_path_nor_a_repo_id(hub):
    with pytest.raises(ResolveError, match="no such file or folder, and not a Hugging Face repo id"):
        resolve_model("./no/such/place/at/all")


def test_pro_variant_on_lite_weights_names_both(hub):
    cache_repo(hub, LITE_DIFFUSERS, diffusers_files(PRESETS["lite"]))
    with pytest.raises(V.VariantError, match=r"t2v-pro-sft-10s-hd is for Kandinsky 5 pro weights .* has lite weights"):
        resolve_model(LITE_DIFFUSERS, "t2v-pro-sft-10s-hd")


def test_variant_of_another_task_than_the_repo(hub):
    cache_repo(hub, "kandinskylab/Kandinsky-5.0-I2V-Lite-5s",
               {"model/kandinsky5lite_i2v_5s.safetensors": lambda p: sparse_safetensors(p, PRESETS["lite"])})
    with pytest.raises(V.VariantError, match=r"t2v-lite-sft-5s is a t2v model, but .* is the i2v checkpoint"):
        resolve_model("kandinskylab/Kandinsky-5.0-I2V-Lite-5s", "t2v-lite-sft-5s")


def test_original_repo_takes_components_from_a_cached_diffusers_repo(hub):
    components = cache_repo(hub, "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers",
                            diffusers_files(PRESETS["lite"]))
    snap = cache_repo(hub, LITE_ORIGINAL, {
        "config.json": text('{"model_type": "kandinsky5"}'),
        "model/kandinsky5lite_t2v_sft_10s.safetensors": lambda p: sparse_safetensors(p, PRESETS["lite"]),
    })
    r = resolve_model(LITE_ORIGINAL)
    assert (r.kind, r.dit, r.root) == ("file", snap / "model/kandinsky5lite_t2v_sft_10s.safetensors", components)
    assert (r.variant.name, r.config.attention_type, r.config.attention_P) == ("t2v-lite-sft-10s", "nabla", 0.9)


def test_single_file_without_components_names_the_download(hub, tmp_path):
    f = sparse_safetensors(tmp_path / "kandinsky5lite_t2v_sft_10s.safetensors", PRESETS["lite"])
    (tmp_path / "partial" / "vae").mkdir(parents=True)
    with pytest.raises(ResolveError, match=r"components folder .*partial lacks text_encoder/, tokenizer/, "):
        resolve_model(str(f), components=tmp_path / "partial")
    want = r"holds only the DiT.*hf download kandinskylab/Kandinsky-5.0-T2V-Lite-sft-10s-Diffusers --exclude 'trans"
    with pytest.raises(ResolveError, match=want):
        resolve_model(str(f))


def test_single_file_with_a_nabla_variant_gets_nabla_with_its_P(hub, tmp_path):
    """DiT level: the inferred config of an original file is dense; the variant makes the DiT NABLA with its P."""
    components = make_components(tmp_path)
    f = sparse_safetensors(tmp_path / "my_finetune.safetensors", PRESETS["lite"])
    with pytest.raises(V.VariantError, match=r"single-file checkpoint, which carries no settings.*--variant: one of "
                                             r"t2v-lite-sft-5s"):
        resolve_model(str(f), components=components)
    for name, P in (("t2v-lite-sft-10s", 0.9), ("t2v-lite-distilled16steps-10s", 0.9)):
        r = resolve_model(str(f), name, components=components)
        assert (r.kind, r.dit, r.root, r.variant_from) == ("file", f, components, "given")
        with torch.device("meta"):
            dit = Kandinsky5DiT(r.config)
        assert dit.nabla == NablaSpec(P=P, wT=11, wH=3, wW=3)
    r = resolve_model(str(f), "t2v-lite-sft-5s", components=components)
    with torch.device("meta"):
        assert Kandinsky5DiT(r.config).nabla is None  # a dense variant stays dense
    with pytest.raises(V.VariantError, match=r"t2v-pro-sft-10s-sd is for Kandinsky 5 pro weights .*has lite weights"):
        resolve_model(str(f), "t2v-pro-sft-10s-sd", components=components)


def test_single_file_recognised_by_its_file_name(hub, tmp_path):
    components = make_components(tmp_path)
    f = sparse_safetensors(tmp_path / "kandinsky5lite_t2v_distilled16steps_10s.safetensors", PRESETS["lite"])
    r = resolve_model(str(f), components=components)
    assert (r.variant.name, r.variant_from, r.config.attention_P) == ("t2v-lite-distilled16steps-10s", "recognised",
                                                                       0.9)


def test_configured_single_file_runs_nabla(tmp_path):
    """A forward through from_pretrained(config=variant.configure(...)) is the NABLA forward with the variant's P,
    not the dense one the file's own config gives (small shapes: the config sits beside the file)."""
    model = build_model(CFG)
    path = write_checkpoint(model.state_dict(), CFG, tmp_path, "original")
    configured = V.get("t2v-lite-sft-10s").configure(CFG)
    dit = load_dit(path, dtype=torch.float32, config=configured)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 64, 64, CFG.in_channels, generator=g)  # 32 x 32 tokens: 4 x 4 NABLA tiles, STA 3 x 3
    args = (x, torch.randn(1, 5, CFG.in_text_dim, generator=g), torch.randn(1, CFG.in_text_dim2, generator=g),
            torch.tensor([700.0]))
    with torch.no_grad():
        out = dit(*args)
        model.set_attention("nabla", 0.9)
        want = model(*args)
        model.set_attention("dense")
        dense = model(*args)
    assert dit.nabla == NablaSpec(P=0.9, wT=11, wH=3, wW=3)
    loaded = dit.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())  # the weights are read exactly
    # The loaded weights are views into the file's mapping, the built ones fresh allocations: another memory layout,
    # which may take another GEMM path (7e-7 apart on some CPUs). Dense attention differs by ~3e-3.
    err = rel_err(out, want)
    assert err <= 1e-5, f"from_pretrained vs in-memory DiT, same weights: fp32 rel err {err:.1e} > 1e-5"
    assert not torch.allclose(out, dense)


def test_tiny_takes_any_variant_of_its_task():
    assert tiny_variant(None) is None
    assert tiny_variant("t2v-pro-sft-10s-hd").sampling() == {"steps": 50, "guidance_scale": 5.0, "shift": 5.0}
    assert tiny_variant("i2v-lite-5s").task == "i2v"
    with pytest.raises(V.VariantError, match=r"t2i-lite-sft is a t2i model; the tiny model runs t2v/i2v"):
        tiny_variant("t2i-lite-sft")
    with pytest.raises(V.VariantError, match="unknown variant"):
        tiny_variant("t2v-lite-sft")


def test_tiny_model_takes_a_variants_sampling_settings():
    r = resolve_model("tiny", "t2v-lite-sft-5s")
    assert (r.kind, r.task, r.variant.name, r.variant_from) == ("tiny", "t2v", "t2v-lite-sft-5s", "given")
    # The tiny model's own size; the variant's steps, guidance, shift and MagCache ratios (Lite sft 5 s: 98 ratios).
    assert r.defaults() == {"height": 128, "width": 128, "num_frames": 9, "steps": 50, "guidance_scale": 5.0,
                            "shift": 5.0}
    assert len(r.mag_ratios) == 98 and r.config.model_dim == 64  # the tiny DiT, not Lite's
    assert resolve_model("tiny").defaults() == {"height": 128, "width": 128, "num_frames": 9, "steps": 4}
    assert resolve_model("tiny", "i2v-pro-sft-5s-sd").task == "i2v"
    with pytest.raises(V.VariantError, match=r"t2i-lite-sft is a t2i model; the tiny model --model tiny runs t2v/i2v"):
        resolve_model("tiny", "t2i-lite-sft")


def test_tiny_image_is_one_checkpoint_per_task():
    t2i, i2i = resolve_model("tiny-image"), resolve_model("tiny-image", tiny_task="i2i")
    assert (t2i.task, t2i.config.visual_cond, i2i.task, i2i.config.visual_cond) == ("t2i", False, "i2i", True)
    assert t2i.root != i2i.root and t2i.defaults() == {"steps": 4}  # sizes: the buckets (engine.pipelines.image_request)
    # a variant of its tasks gives its sampling settings (the reference image pipelines': 3.5, shift 3) and its task
    r = resolve_model("tiny-image", "i2i-lite-sft")
    assert (r.task, r.config.visual_cond) == ("i2i", True)
    assert r.defaults() == {"steps": 50, "guidance_scale": 3.5, "shift": 3.0}
    with pytest.raises(ResolveError, match=r"--task t2v: the tiny model --model tiny-image runs t2i or i2i; "
                                           r"--model tiny runs t2v and i2v"):
        resolve_model("tiny-image", tiny_task="t2v")
    with pytest.raises(V.VariantError, match=r"t2v-lite-sft-5s is a t2v model; the tiny model --model tiny-image "
                                             r"runs t2i/i2i"):
        resolve_model("tiny-image", "t2v-lite-sft-5s")


def test_a_folders_task_and_defaults(hub, tmp_path):
    snap = cache_repo(hub, LITE_DIFFUSERS, diffusers_files(PRESETS["lite"]))
    r = resolve_model(LITE_DIFFUSERS)
    assert r.task == "t2v" and r.defaults() == {"steps": 50, "guidance_scale": 5.0, "shift": 5.0, "height": 512,
                                                "width": 768, "num_frames": 241}
    # An unrecognised folder: no variant, no defaults; its task from model_index.json's pipeline class.
    folder = tmp_path / "my-finetune"
    shutil.copytree(snap, folder, symlinks=True)  # links to the blobs: the sparse weights are not copied
    (folder / "model_index.json").unlink()
    for cls, task in (("Kandinsky5I2VPipeline", "i2v"), ("Kandinsky5T2IPipeline", "t2i"), ("Other", None)):
        (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        r = resolve_model(str(folder))
        assert (r.variant, r.task, r.defaults()) == (None, task, {})
