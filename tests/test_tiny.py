"""The tiny checkpoint: complete diffusers layout, byte-reproducible, and loadable by the libraries themselves.

Oracles: diffusers/transformers `from_pretrained` of every component, diffusers' Kandinsky5T2VPipeline constants
(template, crop 128), and the real HunyuanVideo compression worked out by hand (4k+1 frames -> k+1, H/8, 16 ch).
"""

import hashlib
import inspect
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline
from diffusers import Kandinsky5Transformer3DModel
from transformers import AutoTokenizer, CLIPTextModel, Qwen2_5_VLForConditionalGeneration

import k5.engine.catalogue.tiny as tiny_mod
from k5.engine.encoders.text import VIDEO_TEMPLATE_PREFIX
from k5.engine.catalogue.tiny import build_tiny_checkpoint, tiny_checkpoint

COMPONENTS = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"]


def digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def test_layout_is_a_complete_diffusers_pipeline(tiny):
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "Kandinsky5T2VPipeline"
    assert sorted(k for k in index if not k.startswith("_")) == COMPONENTS
    # Every component the pipeline's __init__ takes is listed (the real repos' model_index has all seven).
    assert sorted(list(inspect.signature(Kandinsky5T2VPipeline.__init__).parameters)[1:]) == COMPONENTS
    for name in COMPONENTS:
        assert (tiny / name).is_dir(), name
    assert json.loads((tiny / "scheduler" / "scheduler_config.json").read_text()) == {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0
    }  # fmt: skip
    # The whole folder loads as a diffusers pipeline, component by component.
    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 5.0
    assert isinstance(pipe.transformer, Kandinsky5Transformer3DModel)
    assert isinstance(pipe.vae, AutoencoderKLHunyuanVideo)
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(pipe.text_encoder_2, CLIPTextModel)
    assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer" and type(pipe.tokenizer_2).__name__ == "CLIPTokenizer"


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    assert digest(again) == digest(tiny)
    other = digest(build_tiny_checkpoint(tmp_path / "other", seed=1))
    assert other["transformer/diffusion_pytorch_model.safetensors"] != digest(tiny)[
        "transformer/diffusion_pytorch_model.safetensors"
    ]
    assert other["tokenizer/tokenizer.json"] == digest(tiny)["tokenizer/tokenizer.json"]  # no weights in it


def test_transformer_loads_in_diffusers_with_random_modulation(tiny):
    model = Kandinsky5Transformer3DModel.from_pretrained(tiny / "transformer").eval()
    cfg = model.config
    assert (cfg.visual_cond, cfg.in_visual_dim, cfg.out_visual_dim, tuple(cfg.patch_size)) == (True, 16, 16, (1, 2, 2))
    assert cfg.model_dim // sum(cfg.axes_dims) == 4 and cfg.attention_type == "regular"
    # The text inputs are the tiny text encoders' widths.
    qwen = json.loads((tiny / "text_encoder" / "config.json").read_text())["text_config"]
    clip = json.loads((tiny / "text_encoder_2" / "config.json").read_text())
    assert (cfg.in_text_dim, cfg.in_text_dim2) == (qwen["hidden_size"], clip["hidden_size"])
    assert cfg.in_text_dim != cfg.in_text_dim2
    # Nothing left at the library's init: zero modulation would make every block an identity, ones in norms
    # would hide a missing norm weight.
    for name, p in model.named_parameters():
        assert p.std() > 1e-2, name
    # A forward pass runs and is non-trivial.
    t, h, w = 2, 4, 4
    x = torch.randn(1, t, h, w, 33)
    with torch.no_grad():
        out = model(
            hidden_states=x, encoder_hidden_states=torch.randn(1, 5, 32), timestep=torch.tensor([500.0]),
            pooled_projections=torch.randn(1, 24), visual_rope_pos=[torch.arange(t), torch.arange(h // 2),
            torch.arange(w // 2)], text_rope_pos=torch.arange(5),
        ).sample  # fmt: skip
    assert out.shape == (1, t, h, w, 16) and torch.isfinite(out).all() and out.std() > 1e-2


def test_nabla_variant_config(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "nabla", attention="nabla")
    cfg = Kandinsky5Transformer3DModel.from_pretrained(folder / "transformer").config
    assert cfg.attention_type == "nabla" and cfg.attention_method == "topcdf" and cfg.attention_P == 0.9
    assert (cfg.attention_wT, cfg.attention_wH, cfg.attention_wW, cfg.attention_add_sta) == (11, 3, 3, True)
    with pytest.raises(ValueError, match="attention="):
        build_tiny_checkpoint(tmp_path / "bad", attention="flash")


@torch.no_grad()
def test_vae_loads_with_real_compression(tiny):
    vae = AutoencoderKLHunyuanVideo.from_pretrained(tiny / "vae").eval()
    assert vae.config.scaling_factor == 0.476986 and vae.config.latent_channels == 16
    for k in (0, 2):  # 4k+1 frames -> k+1 latent frames, 8x spatial
        video = torch.randn(1, 3, 4 * k + 1, 16, 24)
        latent = vae.encode(video).latent_dist.mode()
        assert latent.shape == (1, 16, k + 1, 2, 3)
        assert vae.decode(latent).sample.shape == video.shape


def test_tokenizers_reproduce_the_real_prefix_lengths(tiny):
    qwen = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    pipe = Kandinsky5T2VPipeline(None, None, None, qwen, None, None, None)
    diffusers_prefix = pipe.prompt_template.split("{}")[0]
    assert diffusers_prefix.replace("a prompt engineer", "a promt engineer") == VIDEO_TEMPLATE_PREFIX
    # Real Qwen2.5-VL: 129 tokens for the original prefix, 128 for diffusers' (its hard-coded crop).
    assert len(qwen(VIDEO_TEMPLATE_PREFIX)["input_ids"]) == 129
    assert len(qwen(diffusers_prefix)["input_ids"]) == pipe.prompt_template_encode_start_idx == 128
    assert qwen.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == qwen(["<|im_start|><|im_end|>"])[
        "input_ids"
    ][0]  # specials are single tokens
    assert qwen.pad_token == "<|endoftext|>" and qwen.padding_side == "right"
    assert 256 < len(qwen) < 1024
    text = "A red fox jumps over the fence at sunset"
    assert qwen.decode(qwen(text)["input_ids"]) == text
    clip = AutoTokenizer.from_pretrained(tiny / "tokenizer_2")
    ids = clip(text)["input_ids"]
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and clip.decode(ids[1:-1]) == text.lower()


def test_text_encoders_load_in_transformers(tiny):
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny / "text_encoder")
    vocab = len(AutoTokenizer.from_pretrained(tiny / "tokenizer"))
    assert qwen.config.text_config.vocab_size == vocab and qwen.config.text_config.hidden_size == 32
    clip = CLIPTextModel.from_pretrained(tiny / "text_encoder_2")
    assert clip.config.hidden_size == 24 and clip.config.max_position_embeddings == 77


def test_cache_builds_once_and_survives_a_lost_race(tmp_path, monkeypatch):
    first = tiny_checkpoint(cache_dir=tmp_path)
    assert tiny_checkpoint(cache_dir=tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no half-built leftovers
    # Another process finishes the same folder while we build: our rename fails, we use theirs and clean up.
    other = tmp_path / "other"

    def lose_race(src, dst):
        shutil.copytree(first, dst)  # "their" folder lands first
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(tiny_mod.os, "rename", lose_race)
    assert tiny_checkpoint(cache_dir=other, seed=0) == other / first.name
    assert [p.name for p in other.iterdir()] == [first.name]
    assert digest(other / first.name) == digest(first)
