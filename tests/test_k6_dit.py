"""Kandinsky6DiT against diffusers' Kandinsky6Transformer3DModel (the independent reference) on random weights, fp32.

Tolerance 1e-5 relative (L2, both outputs). No deliberate difference is left to hand over: diffusers' Kandinsky 6
applies RoPE in fp32 and casts back to the compute dtype, so, unlike its Kandinsky 5 port (tests/test_dit.py), it
does not round q and k to bf16 in an fp32 run; the two models compute the same operations in the same order and
measure 0 on these shapes. A second reference for what the numbers mean: the same model with one sub-layer cut
(the text mask dropped, the audio absent) moves the outputs by far more than the tolerance.
"""

import json

import pytest
import torch
from diffusers import Kandinsky6Transformer3DModel
from safetensors.torch import load_file, save_file

from k5.engine.checkpoints.state_dict import infer_k6_config, k6_model_name
from k5.engine.model.k6_config import PRESETS, K6Config
from k5.engine.model.k6_dit import Kandinsky6DiT, param_count
from k5.engine.checkpoints.dit import load_k6_dit
from numerics import rel_err

TOL = 1e-5
BASE = dict(in_visual_dim=16, in_text_dim=24, in_text_dim2=12, time_dim=32, model_dim=64, ff_dim=128,
            num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True, in_audio_dim=8,
            model_dim_a=48, ff_dim_a=96, axes_dims_a=(4, 6, 6), audio_freqs_scaling=0.144)
SHAPES = {
    # the released flags, unequal stream widths, I2AV token types, a PiFlow-widened output (n_grid 3)
    "released": dict(BASE, out_visual_dim=48, out_audio_dim=24, time_dim_a=24, text_token_padding=True, ca_rope=True,
                     cross_gates=True, fix_modulation=True, visual_token_type_num_embeddings=2),
    # diffusers' defaults for the flags: no cross-modal RoPE, per-stream gates, each stream modulated by the other's
    # time; another head split for the audio stream
    "plain": dict(BASE, out_visual_dim=16, out_audio_dim=8, axes_dims_a=(4, 4, 4), scale_factor=(1.0, 3.0, 2.5)),
}


def make_reference(kind: str, seed: int = 0) -> Kandinsky6Transformer3DModel:
    torch.manual_seed(seed)
    ref = Kandinsky6Transformer3DModel(**SHAPES[kind])
    with torch.no_grad():  # diffusers' init leaves nothing at zero here, but random values make every layer matter
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1))
    return ref.eval()


def inputs(cfg: dict, B=2, T=3, H=4, W=6, La=10, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, T, H, W, 2 * cfg["in_visual_dim"] + 1, generator=g),
                audio=torch.randn(B, La, cfg["in_audio_dim"], generator=g),
                text=torch.randn(B, L, cfg["in_text_dim"], generator=g),
                pooled=torch.randn(B, cfg["in_text_dim2"], generator=g),
                t=torch.rand(B, generator=g) * 1000)


def reference_forward(ref, inp, **kwargs):
    out = ref(hidden_states=inp["x"], encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"],
              timestep=inp["t"], audio_hidden_states=inp["audio"], return_dict=False, **kwargs)
    return out if len(out) == 2 else (out[0], None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for kind in SHAPES:
        ref = make_reference(kind)
        folder = tmp_path_factory.mktemp(kind) / "transformer"
        ref.save_pretrained(folder)
        out[kind] = (ref, folder)
    return out


def assert_close(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) <= TOL, rel_err(g, w)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_video_and_audio_match_diffusers(saved, kind):
    ref, folder = saved[kind]
    ours = load_k6_dit(folder, dtype=torch.float32)
    assert ours.config == K6Config.from_dict(json.loads((folder / "config.json").read_text()))
    inp = inputs(SHAPES[kind])
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False  # one padded prompt
    with torch.no_grad():
        want = reference_forward(ref, inp, encoder_attention_mask=mask)
        got = ours(inp["x"], inp["audio"], inp["text"], inp["pooled"], inp["t"], text_mask=mask)
        unmasked = ours(inp["x"], inp["audio"], inp["text"], inp["pooled"], inp["t"])
    cfg = SHAPES[kind]
    assert got[0].shape == (2, 3, 4, 6, cfg["out_visual_dim"]) and got[1].shape == (2, 10, cfg["out_audio_dim"])
    assert_close(got, want)
    assert min(rel_err(u, w) for u, w in zip(unmasked, want)) > 1e-3  # the mask matters at this tolerance


def test_video_alone_matches_diffusers(saved):
    """Without audio the fused blocks run their video sub-layers only (diffusers' sample_audio=False)."""
    ref, folder = saved["released"]
    ours = load_k6_dit(folder, dtype=torch.float32)
    inp = dict(inputs(SHAPES["released"]), audio=None)
    with torch.no_grad():
        want = reference_forward(ref, inp)
        got = ours(inp["x"], None, inp["text"], inp["pooled"], inp["t"])
        with_audio = ours(inp["x"], inputs(SHAPES["released"])["audio"], inp["text"], inp["pooled"], inp["t"])
    assert got[1] is None and want[1] is None
    assert rel_err(got[0], want[0]) <= TOL
    assert rel_err(with_audio[0], want[0]) > 1e-3  # the audio stream does reach the video


def test_i2av_tail_frame_inputs_match_diffusers(saved):
    """I2AV's forward: a tail frame with token type 1 and RoPE time position 0 (the pipeline builds these)."""
    ref, folder = saved["released"]
    ours = load_k6_dit(folder, dtype=torch.float32)
    inp = inputs(SHAPES["released"], T=4)
    types = torch.tensor([[0, 0, 0, 1]] * 2)
    pos = (torch.tensor([0, 1, 2, 0]), torch.arange(2), torch.arange(3))
    with torch.no_grad():
        want = reference_forward(ref, inp, visual_rope_pos=pos, visual_token_type_ids=types)
        got = ours(inp["x"], inp["audio"], inp["text"], inp["pooled"], inp["t"], visual_rope_pos=pos,
                   visual_token_type_ids=types)
        plain = ours(inp["x"], inp["audio"], inp["text"], inp["pooled"], inp["t"])
    assert_close(got, want)
    assert rel_err(plain[0], want[0]) > 1e-3


def test_original_single_file_layout(saved, tmp_path):
    """The original layout (the diffusers names mapped by engine/checkpoints/state_dict.py's K6 rules) in one file with no config: the
    config is inferred from the shapes with the release constants, which the "released" shape uses."""
    ref, folder = saved["released"]
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    original = {k6_model_name(k): v for k, v in tensors.items()}
    assert "visual_blocks.0.videoT.feed_forward.in_layer.weight" in original
    assert "video_time_embeddings.in_layer.weight" in original and "audio_outLayer.out_layer.weight" in original
    single = tmp_path / "kandinsky6_tiny.safetensors"
    save_file(original, single)
    ours = load_k6_dit(single, dtype=torch.float32)
    want_cfg = K6Config.from_dict(json.loads((folder / "config.json").read_text()))
    assert ours.config == want_cfg.replace(scale_factor=(1.0, 2.0, 2.0))
    inp = inputs(SHAPES["released"])
    with torch.no_grad():
        assert_close(ours(inp["x"], inp["audio"], inp["text"], inp["pooled"], inp["t"]), reference_forward(ref, inp))


def test_sharded_checkpoint_and_mixed_layouts_refused(saved, tmp_path):
    ref, folder = saved["plain"]
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_k6_dit(tmp_path, dtype=torch.float32)  # the pipeline root works too
    inp = inputs(SHAPES["plain"])
    with torch.no_grad():
        assert_close(ours(inp["x"], inp["audio"], inp["text"], inp["pooled"], inp["t"]), reference_forward(ref, inp))
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    name = "visual_transformer_blocks.0.video_dec_block.feed_forward.net.2.weight"
    tensors[k6_model_name(name)] = tensors[name].clone()  # the same tensor under both layouts' names
    mixed = tmp_path / "mixed" / "transformer"
    mixed.mkdir(parents=True)
    save_file(tensors, mixed / "diffusion_pytorch_model.safetensors")
    (mixed / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="mixes two layouts"):
        load_k6_dit(mixed)


def test_bad_inputs():
    cfg = K6Config(**{k: v for k, v in SHAPES["released"].items()})
    model = Kandinsky6DiT(cfg)
    inp = inputs(SHAPES["released"])
    with pytest.raises(ValueError, match="channels"):
        model(inp["x"][..., :16], inp["audio"], inp["text"], inp["pooled"], inp["t"])
    with pytest.raises(ValueError, match="audio latent"):
        model(inp["x"], inp["audio"][..., :5], inp["text"], inp["pooled"], inp["t"])
    with pytest.raises(ValueError, match="ca_rope"):
        K6Config(**dict(SHAPES["released"], axes_dims_a=(4, 4, 4)))
    with pytest.raises(ValueError, match="n_grid"):
        K6Config(**dict(SHAPES["released"], out_audio_dim=8))


@pytest.mark.parametrize("preset", ["lite", "lite-distill", "pro"])
def test_presets_are_what_their_shapes_say(preset):
    """A diffusers model built from a preset's config has the shapes our inference reads back into that preset."""
    want = PRESETS[preset].replace(num_visual_blocks=2)
    kwargs = {k: v for k, v in want.to_dict().items() if not k.startswith("_") and not k.startswith("attention")}
    with torch.device("meta"):
        ref = Kandinsky6Transformer3DModel(**kwargs)
    shapes = {k6_model_name(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert infer_k6_config(shapes) == want
    with torch.device("meta"):
        ours = Kandinsky6DiT(want)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes


def test_released_sizes():
    """The issue's figures, Lite 3B and Pro 29B parameters (measured 3.18B and 30.1B), and the tensor counts of the
    published bundles that vLLM-Omni's loader test quotes: Lite 2,399, Pro-distill 4,471 (which fixes the block
    counts and the I2AV token-type table of both)."""
    assert 2.7e9 < param_count(PRESETS["lite"]) < 3.9e9
    assert 26e9 < param_count(PRESETS["pro"]) < 31e9
    for preset, tensors in (("lite", 2399), ("pro-distill", 4471)):
        with torch.device("meta"):
            assert len(Kandinsky6DiT(PRESETS[preset]).state_dict()) == tensors


def test_bf16_matches_diffusers_in_bf16(saved):
    """Both models in bf16 (diffusers keeps its time embeddings and modulation fp32, as we do; we also keep the q/k
    norm weights fp32): within 2e-2 relative (measured 6e-3)."""
    _, folder = saved["released"]
    ref = Kandinsky6Transformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    ours = load_k6_dit(folder, dtype=torch.bfloat16)
    assert ours.visual_blocks[0].va_modulation.out_layer.weight.dtype == torch.float32
    assert ours.audio_time_embeddings.in_layer.weight.dtype == torch.float32
    assert ours.visual_blocks[0].audioT.feed_forward.in_layer.weight.dtype == torch.bfloat16
    inp = {k: v.to(torch.bfloat16) if k != "t" else v for k, v in inputs(SHAPES["released"]).items()}
    with torch.no_grad():
        want = reference_forward(ref, inp)
        got = ours(inp["x"], inp["audio"], inp["text"], inp["pooled"], inp["t"])
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert rel_err(g.float(), w.float()) <= 2e-2
