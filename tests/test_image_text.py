"""Image Lite prompt embeddings against diffusers' Kandinsky5T2IPipeline / Kandinsky5I2IPipeline encode paths.

Oracle: diffusers 0.42 `_encode_prompt_qwen` on transformers' own `from_pretrained` Qwen2_5_VLForConditionalGeneration
(its key conversion and its multimodal forward check our meta-device loading of decoder and vision tower), with
transformers' Qwen2VLProcessor (PIL image backend) as the I2I tokenizer. Deliberate differences, given to the oracle
so that it computes the original's embeddings:
- template: diffusers fixes "promt" (crop 40 for T2I) and, for I2I, also drops the newlines around "user" (crop 54);
  the oracle gets the original's templates and crops 41 / 55;
- I2I image for Qwen: diffusers halves the source image with PIL's default filter, the original (and we) with an
  antialiased bilinear resize; the oracle is handed our half-size image (qwen_image is checked against PIL's
  bilinear separately, in test_image.py);
- padding: we pad T2I prompts to the 512-token budget with a key mask, diffusers to the longest prompt; the real
  tokens are compared.
Tolerance: fp32 both sides; measured bitwise equal (values of size ~4), asserted atol 1e-5.
"""

import numpy as np
import pytest
import torch
from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from k5.engine.pipelines.image_request import fit_to_bucket, qwen_image
from k5.engine.encoders.text import IMAGE, IMAGE_EDIT, TextEncoder
from k5.engine.catalogue.tiny import tiny_checkpoint

PROMPTS = ["A cat walks on the grass", "Make the sky purple and add a red balloon over the city, keep the rest"]
ATOL = 1e-5


class Processor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its class check, which wants the torchvision video processor (absent here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return type(argument)


def processor(root):
    return Processor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(root / "tokenizer"),
                     tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"))


@pytest.fixture(scope="module")
def tiny():
    return tiny_checkpoint(kind="i2i")


@pytest.fixture(scope="module")
def encoder(tiny):
    return TextEncoder.from_pretrained(tiny, torch_dtype=torch.float32, device="cpu")


def oracle(cls, tiny, template, crop, tokenizer):
    pipe = cls(transformer=None, vae=None,
               text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny / "text_encoder").eval(),
               tokenizer=tokenizer, text_encoder_2=CLIPTextModel.from_pretrained(tiny / "text_encoder_2").eval(),
               tokenizer_2=AutoTokenizer.from_pretrained(tiny / "tokenizer_2"), scheduler=None)
    pipe.prompt_template, pipe.prompt_template_encode_start_idx = template, crop
    return pipe


def source_images():
    rng = np.random.default_rng(0)
    src = torch.from_numpy((rng.random((3, 700, 1500)) * 255).astype(np.uint8))
    return fit_to_bucket(src, 640, 1408)


class HalvesToOurs:
    """A PIL image whose halving (what diffusers does before Qwen) gives the half-size image we hand to Qwen."""

    def __init__(self, fitted):
        self.half = Image.fromarray(qwen_image(fitted))
        self.size = (fitted.shape[-1], fitted.shape[-2])

    def resize(self, size):
        assert tuple(size) == (self.size[0] // 2, self.size[1] // 2)
        return self.half


def test_diffusers_templates_differ_only_as_stated(tiny):
    t2i = Kandinsky5T2IPipeline(None, None, None, None, None, None, None)
    i2i = Kandinsky5I2IPipeline(None, None, None, None, None, None, None)
    assert t2i.prompt_template == IMAGE.template.replace("promt", "prompt")
    assert (t2i.prompt_template_encode_start_idx, IMAGE.crop_start) == (40, 41)
    assert i2i.prompt_template == IMAGE_EDIT.template.replace("promt", "prompt").replace(
        "<|im_end|>\n<|im_start|>user\n", "<|im_end|><|im_start|>user")
    assert (i2i.prompt_template_encode_start_idx, IMAGE_EDIT.crop_start) == (54, 55)
    # The tiny tokenizer reproduces the real one's image prefix: every word one token but the typo "promt".
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    assert len(tok(IMAGE.template.split("{}")[0])["input_ids"]) == 41
    assert len(tok(t2i.prompt_template.split("{}")[0])["input_ids"]) == 40


@torch.no_grad()
def test_t2i_embeds_match_diffusers(encoder, tiny):
    ref = oracle(Kandinsky5T2IPipeline, tiny, IMAGE.template, 41, AutoTokenizer.from_pretrained(tiny / "tokenizer"))
    out = encoder.encode(PROMPTS, fmt=IMAGE)
    embeds, cu = ref._encode_prompt_qwen(PROMPTS, device=torch.device("cpu"), max_sequence_length=512)
    pooled = ref._encode_prompt_clip(PROMPTS, device=torch.device("cpu"))
    assert out.embeds.shape == (2, 512, 32) and out.mask.shape == (2, 512)
    lengths = cu.diff().tolist()
    assert lengths[0] != lengths[1]
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out.embeds[i, :n], embeds[i, :n], atol=ATOL, rtol=0)
        assert out.mask[i, :n].all() and not out.mask[i, n:].any()
    torch.testing.assert_close(out.pooled, pooled, atol=ATOL, rtol=0)
    assert out.truncated == [False, False]


@torch.no_grad()
def test_t2i_budget_is_512_prompt_tokens(encoder):
    # " the" is one token of the tiny vocabulary; the closing <|im_end|> is one more.
    fits, cut = " the" * 511, " the" * 512
    out = encoder.encode([fits, cut], fmt=IMAGE)
    assert out.truncated == [False, True]
    assert out.mask.all() and out.embeds.shape[1] == 512


def test_vision_inputs_equal_the_processor(encoder, tiny):
    fitted = source_images()
    text = IMAGE_EDIT.template.format(PROMPTS[1])
    ours = encoder._load_vision().inputs(encoder.qwen_tokenizer, text, qwen_image(fitted))
    ref = processor(tiny)(text=[text], images=[Image.fromarray(qwen_image(fitted))], return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["pixel_values"], ref["pixel_values"]) and torch.equal(ours["image_grid_thw"],
                                                                                  ref["image_grid_thw"])
    assert torch.equal((ours["input_ids"] == encoder.vision.image_token_id).int(), ref["mm_token_type_ids"])
    # 320x704 half image -> smart resize to 308x700 -> 22x50 patches -> 11x25 merged tokens
    assert ref["image_grid_thw"].tolist() == [[1, 22, 50]]
    assert int((ref["input_ids"] == encoder.vision.image_token_id).sum()) == 275


@torch.no_grad()
def test_i2i_embeds_match_diffusers(encoder, tiny):
    fitted = source_images()
    ref = oracle(Kandinsky5I2IPipeline, tiny, IMAGE_EDIT.template, 55, processor(tiny))
    prompts = PROMPTS + [""]  # "" is the image models' default negative prompt
    out = encoder.encode(prompts, fmt=IMAGE_EDIT, images=[qwen_image(fitted)] * 3)
    for i, p in enumerate(prompts):
        want, cu = ref._encode_prompt_qwen([p], image=HalvesToOurs(fitted), device=torch.device("cpu"))
        n = int(cu[-1])
        assert int(out.mask[i].sum()) == n == want.shape[1] and not out.mask[i, n:].any()
        torch.testing.assert_close(out.embeds[i, :n], want[0], atol=ATOL, rtol=0)
    assert out.truncated == [False] * 3
    # The image tokens are in the sequence: 275 of them after the (cropped) prompt.
    assert out.embeds.shape[1] > 275 and int(out.mask[2].sum()) == 52 + 275 + 3 - 55


@torch.no_grad()
def test_i2i_budget_cuts_the_prompt_not_the_image(encoder):
    fitted = source_images()
    image = qwen_image(fitted)
    out = encoder.encode([" the" * 2000], fmt=IMAGE_EDIT, images=[image])
    assert out.truncated == [True] and out.embeds.shape[1] == 1024
    # The kept sequence is the full one with prompt tokens removed from the end of the prompt.
    vision = encoder.vision
    full = vision.inputs(encoder.qwen_tokenizer, IMAGE_EDIT.template.format(" the" * 2000), image)
    ids = full["input_ids"]
    kept = torch.cat([ids[:, : 55 + 1024 - 278], ids[:, -278:]], 1)
    hidden = vision.model(input_ids=kept, attention_mask=torch.ones_like(kept), pixel_values=full["pixel_values"],
                          image_grid_thw=full["image_grid_thw"],
                          mm_token_type_ids=(kept == vision.image_token_id).int()).last_hidden_state
    torch.testing.assert_close(out.embeds[0], hidden[0, 55:], atol=0, rtol=0)  # encode's own model call, by hand


def test_format_and_images_must_agree(encoder):
    with pytest.raises(ValueError, match="one image per prompt"):
        encoder.encode(["a cat"], fmt=IMAGE_EDIT)
    with pytest.raises(ValueError, match="no image"):
        encoder.encode(["a cat"], fmt=IMAGE, images=[np.zeros((28, 28, 3), np.uint8)])


@torch.no_grad()
def test_vision_tower_loads_new_style_keys_and_is_only_needed_for_images(encoder, tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from numerics import rel_err

    fitted = source_images()
    want = encoder.encode(PROMPTS[:1], fmt=IMAGE_EDIT, images=[qwen_image(fitted)])
    folder = tmp_path / "new"
    shutil.copytree(tiny, folder)
    file = folder / "text_encoder" / "model.safetensors"
    state = load_file(file)
    assert any(k.startswith("visual.blocks.1.") for k in state)  # legacy names in the tiny save
    renamed = {}
    for k, v in state.items():  # transformers >= 4.52 names: model.visual.*, model.language_model.*
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        renamed[k] = v
    save_file(renamed, file, metadata={"format": "pt"})
    other = TextEncoder.from_pretrained(folder, torch_dtype=torch.float32)
    # A rewritten file: each tensor at another offset, so another weight layout, which may take another GEMM path.
    err = rel_err(other.encode(PROMPTS[:1], fmt=IMAGE_EDIT, images=[qwen_image(fitted)]).embeds, want.embeds)
    assert err <= 1e-5, f"new-style vs legacy keys, same weights: fp32 rel err {err:.1e} > 1e-5"
    tower = encoder.vision.tower.state_dict()
    assert all(torch.equal(p, tower[k]) for k, p in other.vision.tower.state_dict().items())  # read exactly

    # A text-only Qwen checkpoint (no vision tower) still runs T2I; an edit names what is missing.
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(tiny / "text_encoder", folder / "text_encoder")
    save_file({k: v for k, v in state.items() if not k.startswith("visual.")}, file, metadata={"format": "pt"})
    text_only = TextEncoder.from_pretrained(folder, torch_dtype=torch.float32)
    err = rel_err(text_only.encode(PROMPTS, fmt=IMAGE).embeds, encoder.encode(PROMPTS, fmt=IMAGE).embeds)
    assert err <= 1e-5, f"text-only vs full checkpoint, same weights: fp32 rel err {err:.1e} > 1e-5"
    with pytest.raises(ValueError, match="component 'text_encoder' .* vision-tower weights not found"):
        text_only.encode(PROMPTS[:1], fmt=IMAGE_EDIT, images=[qwen_image(fitted)])


@torch.no_grad()
def test_bf16_image_prompt(encoder, tiny):
    from numerics import rel_err

    fitted = source_images()
    enc16 = TextEncoder.from_pretrained(tiny, torch_dtype=torch.bfloat16)
    out16 = enc16.encode(PROMPTS[:1], fmt=IMAGE_EDIT, images=[qwen_image(fitted)])
    out32 = encoder.encode(PROMPTS[:1], fmt=IMAGE_EDIT, images=[qwen_image(fitted)])
    assert enc16.vision.tower.patch_embed.proj.weight.dtype == torch.bfloat16
    assert enc16.vision.tower.rotary_pos_emb.inv_freq.dtype == torch.float32
    assert out16.embeds.dtype == torch.bfloat16 and torch.equal(out16.mask, out32.mask)
    assert rel_err(out16.embeds, out32.embeds) < 5e-2  # bf16 weights, 2 + 2 layers: measured 1.5e-2
