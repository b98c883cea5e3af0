"""TextEncoder against diffusers' Kandinsky5T2VPipeline text path and transformers' own model loading (tiny checkpoint).

Oracle: diffusers 0.42 `_encode_prompt_qwen` / `_encode_prompt_clip` on models loaded by transformers'
`from_pretrained` (full Qwen2_5_VLForConditionalGeneration with its own key conversion, so our meta-device text-only
loader is checked too). Diffusers fixed the template typo ("prompt engineer") and crops 128; the original is the same
template with "promt" and crop 129, so the oracle gets exactly that one-word change and nothing else.
Tolerance: fp32 on both sides; the only difference is the padded length (385 vs longest), which changes SDPA
blocking: measured max abs diff <= 1e-6 on values of size ~3, asserted atol 1e-5.
"""

import inspect
import json
import re
import shutil

import pytest
import torch
from diffusers import Kandinsky5T2VPipeline
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPTextModel, Qwen2_5_VLForConditionalGeneration

from k5.engine.pipelines.video import Kandinsky5Pipeline, Request
from k5.engine.encoders.text import (
    DEFAULT_NEGATIVE_PROMPT,
    QWEN_MAX_LENGTH,
    VIDEO_PROMPT_TEMPLATE,
    TextEncoder,
)
from k5.engine.catalogue.tiny import tiny_checkpoint
from numerics import rel_err

PROMPTS = ["A cat walks on the grass", "A red fox jumps over the fence at sunset, cinematic lighting, 35mm film"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(cache_dir=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def encoder(tiny):
    return TextEncoder.from_pretrained(tiny, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def oracle(tiny):
    """diffusers' pipeline text path, template typo restored and crop set to the original's."""
    pipe = Kandinsky5T2VPipeline(
        transformer=None,
        vae=None,
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(tiny / "tokenizer"),
        text_encoder_2=CLIPTextModel.from_pretrained(tiny / "text_encoder_2").eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(tiny / "tokenizer_2"),
        scheduler=None,
    )
    assert "a prompt engineer" in pipe.prompt_template and pipe.prompt_template_encode_start_idx == 128
    pipe.prompt_template = pipe.prompt_template.replace("a prompt engineer", "a promt engineer")
    pipe.prompt_template_encode_start_idx = 129
    return pipe


def test_template_is_diffusers_with_the_original_typo(oracle, encoder):
    assert VIDEO_PROMPT_TEMPLATE == oracle.prompt_template
    assert encoder.crop_start == 129  # the tiny tokenizer reproduces the real Qwen2.5-VL prefix length


@torch.no_grad()
def test_qwen_embeds_and_mask_match_diffusers(encoder, oracle):
    out = encoder.encode(PROMPTS)
    ref, cu_seqlens = oracle._encode_prompt_qwen(PROMPTS, device=torch.device("cpu"), max_sequence_length=256)
    assert out.embeds.shape == (2, QWEN_MAX_LENGTH, 32) and out.mask.dtype == torch.bool
    lengths = cu_seqlens.diff().tolist()
    assert lengths[0] != lengths[1]  # the batch really is padded
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out.embeds[i, :n], ref[i, :n], atol=ATOL, rtol=0)
        assert out.mask[i, :n].all() and not out.mask[i, n:].any()
    assert out.truncated == [False, False]


@torch.no_grad()
def test_clip_pooled_matches_diffusers_and_eos_hidden_state(encoder, oracle, tiny):
    out = encoder.encode(PROMPTS)
    ref = oracle._encode_prompt_clip(PROMPTS, device=torch.device("cpu"))
    torch.testing.assert_close(out.pooled, ref, atol=ATOL, rtol=0)
    # By hand: pooler_output is the final-LayerNorm hidden state at the first EOS token (no projection).
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer_2")
    ids = tok(PROMPTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    hidden = oracle.text_encoder_2(input_ids=ids).last_hidden_state
    eos = (ids == tok.eos_token_id).int().argmax(1)
    torch.testing.assert_close(out.pooled, hidden[torch.arange(2), eos], atol=ATOL, rtol=0)
    assert out.pooled.shape == (2, 24)


@torch.no_grad()
def test_padding_and_truncation_at_the_256_token_budget(encoder, oracle):
    # " the" is one token of the tiny vocabulary, so n words are n tokens; the closing <|im_end|> is one more.
    assert len(encoder.qwen_tokenizer.tokenize(" the" * 10)) == 10
    fits, cut = " the" * 255, " the" * 256  # 255 + <|im_end|> = 256 fills the budget; 256 + 1 does not
    out = encoder.encode([fits, cut, " the the"])
    assert out.truncated == [False, True, False]
    assert out.embeds.shape[1] == out.mask.shape[1] == QWEN_MAX_LENGTH
    assert out.mask[0].all() and out.mask[1].all() and out.mask[2].sum() == 3  # 2 words + <|im_end|>
    # A truncated prompt is the model run on the first 129 + 256 tokens of the full text (causal decoder).
    ids = encoder.qwen_tokenizer(VIDEO_PROMPT_TEMPLATE.format(cut), return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 129 + 257
    ref = oracle.text_encoder(input_ids=ids[:, : 129 + 256], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out.embeds[1], ref[0, 129:], atol=ATOL, rtol=0)


def test_default_negative_prompt_is_diffusers_default():
    source = inspect.getsource(Kandinsky5T2VPipeline.__call__)
    assert re.search(r'negative_prompt = "([^"]+)"', source).group(1) == DEFAULT_NEGATIVE_PROMPT


@torch.no_grad()
def test_new_style_keys_load_identically(encoder, tiny, tmp_path):
    # transformers 5.23 saves the legacy `model.*` / `visual.*` names; newer saves use `model.language_model.*`.
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    file = folder / "text_encoder" / "model.safetensors"
    state = load_file(file)
    assert any(k.startswith("model.layers.") for k in state) and any(k.startswith("visual.") for k in state)
    renamed = {}
    for k, v in state.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        renamed[k] = v
    save_file(renamed, file, metadata={"format": "pt"})
    other = TextEncoder.from_pretrained(folder, torch_dtype=torch.float32)
    ours = encoder.qwen.state_dict()
    assert all(torch.equal(p, ours[k]) for k, p in other.qwen.state_dict().items())  # the same weights, exactly
    # The rewritten file puts each tensor at another offset, so the loaded views have another alignment: another
    # GEMM path may round differently.
    err = rel_err(other.encode(PROMPTS).embeds, encoder.encode(PROMPTS).embeds)
    assert err <= 1e-5, f"renamed keys vs legacy keys, same weights: fp32 rel err {err:.1e} > 1e-5"


@torch.no_grad()
def test_flat_legacy_config_loads_identically(encoder, tiny, tmp_path):
    # Pre-v5 Qwen2.5-VL configs keep the text fields at the top level and RoPE as rope_scaling {"type": "mrope"}.
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    path = folder / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    del text["model_type"]
    text.update(rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}, rope_theta=rope["rope_theta"])
    path.write_text(json.dumps({**config, **text}))
    other = TextEncoder.from_pretrained(folder, torch_dtype=torch.float32)
    assert other.qwen.config.hidden_size == 32 and len(other.qwen.layers) == 2
    # Bitwise: the weight file is a byte copy (the same layout) and the code is the same; only the config's form
    # differs, so any difference is a setting read differently.
    assert torch.equal(other.encode(PROMPTS).embeds, encoder.encode(PROMPTS).embeds)


@torch.no_grad()
def test_bf16_load(encoder, tiny):
    enc16 = TextEncoder.from_pretrained(tiny, torch_dtype=torch.bfloat16)
    assert enc16.qwen.embed_tokens.weight.dtype == torch.bfloat16
    assert enc16.qwen.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32 as in transformers
    out16, out32 = enc16.encode(PROMPTS), encoder.encode(PROMPTS)
    assert out16.embeds.dtype == torch.bfloat16 and out16.pooled.dtype == torch.float32  # CLIP stays fp32
    n = int(out32.mask[0].sum())
    assert rel_err(out16.embeds[0, :n], out32.embeds[0, :n]) < 5e-2  # bf16 weights, 2 layers: measured 1.9e-2
    assert torch.equal(out16.pooled, out32.pooled)  # the same fp32 CLIP from the same file: the same computation


@torch.no_grad()
def test_bf16_pipeline_hands_the_dit_an_fp32_clip_vector(tiny, monkeypatch):
    """The original runs CLIP in fp32 next to its bf16 Qwen and DiT, passes the fp32 pooled vector to the DiT, whose
    bf16 autocast rounds it once, at the input of pooled_text_embeddings.in_layer. Oracle: an fp32 CLIPTextModel
    built here by transformers from the checkpoint's text_encoder_2, run as the original runs it."""
    pipe = Kandinsky5Pipeline.from_pretrained(tiny, dtype=torch.bfloat16)
    handed, linear_inputs = [], []
    forward = pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward",
                        lambda x, text, pooled, *a, **kw: handed.append(pooled) or forward(x, text, pooled, *a, **kw))
    pipe.dit.pooled_text_embeddings.in_layer.register_forward_hook(lambda m, args, out: linear_inputs.append(args[0]))
    pipe.generate(Request(prompt=PROMPTS[0], height=32, width=32, num_frames=1, steps=1, guidance_scale=5.0))

    clip = CLIPTextModel.from_pretrained(tiny / "text_encoder_2", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny / "tokenizer_2")
    tokens = tokenizer([PROMPTS[0], DEFAULT_NEGATIVE_PROMPT], max_length=77, truncation=True, add_special_tokens=True,
                       padding="max_length", return_tensors="pt")
    want = clip(**tokens)["pooler_output"]
    assert [p.dtype for p in handed] == [torch.float32, torch.float32]  # cond, uncond
    assert torch.equal(handed[0], want[:1]) and torch.equal(handed[1], want[1:])
    # The one rounding, at the DiT's input Linear, as the original's autocast does it.
    assert torch.equal(linear_inputs[0], want[:1].to(torch.bfloat16))
    # A bf16 CLIP (what the pipeline ran before) is measurably off: the test can tell the two apart.
    bf16 = CLIPTextModel.from_pretrained(tiny / "text_encoder_2", dtype=torch.bfloat16).eval()
    assert rel_err(bf16(**tokens)["pooler_output"].float(), want) > 1e-3


def test_release_frees_the_models(tiny):
    enc = TextEncoder.from_pretrained(tiny, torch_dtype=torch.float32)
    enc.release()
    assert enc.qwen is None and enc.clip is None
    with pytest.raises(RuntimeError, match="release"):
        enc.encode(["a cat"])


def test_missing_or_broken_component_is_named(tiny, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="'tokenizer_2'"):
        TextEncoder.from_pretrained(folder, torch_dtype=torch.float32)
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="'text_encoder'"):
        TextEncoder.from_pretrained(folder, torch_dtype=torch.float32)
    with pytest.raises(TypeError, match="list of prompts"):
        TextEncoder.from_pretrained(tiny, torch_dtype=torch.float32).encode("a cat")
