"""tiny-k6: a complete Kandinsky 6 diffusers layout, byte-reproducible, loadable by the libraries and by us.

Oracles: diffusers' Kandinsky6TI2VAPipeline (its __init__'s components, from_pretrained of every one), and the real
audio constants worked out by hand (44.1 kHz, a latent per 1024 samples = the 512-sample mel hop halved once, the
vocoder's x512 upsampling, 40 latent channels).
"""

import hashlib
import inspect
import json

import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, Kandinsky6TI2VAPipeline, Kandinsky6Transformer3DModel,
                       MMAudioVAE, MMAudioVocoder, PiflowScheduler)

from k5.engine.vae.audio import AudioDecoder
from k5.engine.model.k6_config import K6Config
from k5.engine.sampling.k6_schedule import EulerSchedule, PiFlowSchedule, schedule_from_config
from k5.engine.catalogue import k6_tiny
from k5.engine.catalogue.k6_tiny import build_k6_tiny_checkpoint, k6_tiny_checkpoint
from k5.engine.checkpoints.dit import load_k6_dit

COMPONENTS = ["audio_vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer",
              "vae", "vocoder"]


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind,scheduler,schedule", [("sft", FlowMatchEulerDiscreteScheduler, EulerSchedule),
                                                     ("distill", PiflowScheduler, PiFlowSchedule)])
def test_layout_is_a_complete_diffusers_pipeline(kind, scheduler, schedule):
    root = k6_tiny_checkpoint(kind=kind)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "Kandinsky6TI2VAPipeline"
    assert sorted(k for k in index if not k.startswith("_")) == COMPONENTS
    assert sorted(list(inspect.signature(Kandinsky6TI2VAPipeline.__init__).parameters)[1:]) == COMPONENTS
    pipe = Kandinsky6TI2VAPipeline.from_pretrained(root)
    assert isinstance(pipe.scheduler, scheduler) and isinstance(pipe.transformer, Kandinsky6Transformer3DModel)
    assert isinstance(pipe.audio_vae, MMAudioVAE) and isinstance(pipe.vocoder, MMAudioVocoder)
    cfg = K6Config.from_json(root / "transformer" / "config.json")
    assert cfg.ca_rope and cfg.cross_gates and cfg.fix_modulation and cfg.supports_image
    assert cfg.n_grid == (10 if kind == "distill" else 1)
    assert cfg.video.model_dim != cfg.audio.model_dim and cfg.video.time_dim != cfg.audio.time_dim
    assert load_k6_dit(root, dtype=torch.float32).config == cfg
    assert isinstance(schedule_from_config(root, 4), schedule)

    audio = AudioDecoder.from_pretrained(root)
    assert (audio.sample_rate, audio.latent_hop, audio.latent_channels) == (44_100, 1024, cfg.in_audio_dim)
    assert pipe.audio_sample_rate == 44_100 and pipe.audio_latent_hop_length == 1024
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (8, 4)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    cached = k6_tiny_checkpoint(kind="sft")
    again = build_k6_tiny_checkpoint(tmp_path / "again", seed=0, kind="sft")
    assert digest(again) == digest(cached)
    # Another seed (checked on the Kandinsky 6 components: the shared ones are the Kandinsky 5 tiny's, whose own test
    # covers its seeds, and building that for seed 1 would cost this test a tokenizer training).
    for build in (k6_tiny._transformer, k6_tiny._audio_vae, k6_tiny._vocoder):
        args = ("sft",) if build is k6_tiny._transformer else ()
        zero, one = dict(build(*args, 0).named_parameters()), dict(build(*args, 1).named_parameters())
        assert all(torch.equal(p, dict(build(*args, 0).named_parameters())[k]) for k, p in zero.items())
        assert not any(torch.equal(p, one[k]) for k, p in zero.items())


def test_refuses_a_used_folder_and_an_unknown_kind(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        build_k6_tiny_checkpoint(tmp_path / "used")
    with pytest.raises(ValueError, match="sft, distill"):
        build_k6_tiny_checkpoint(tmp_path / "new", kind="pro")
