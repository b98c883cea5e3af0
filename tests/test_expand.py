"""Prompt expansion on the tiny checkpoint against the reference's own route: transformers'
Qwen2_5_VLForConditionalGeneration loaded whole from the checkpoint folder, `generate(max_new_tokens=256)` after
`transformers.set_seed(seed)`, decoded without special tokens (kandinskylab/kandinsky-5 t2v_pipeline.py). k5 runs
the same decoding on the text encoder's own decoder and head; the texts must be equal, token for token.
"""

import pytest
import torch
import transformers
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from distributed import run_distributed
from k5.engine.encoders import expand
from k5.engine.pipelines.video import Kandinsky5Pipeline, Request, make_expander
from k5.engine.encoders.text import TextEncoder
from k5.engine.catalogue.tiny import tiny_checkpoint

PROMPT = "a red fox running through snow"
CHAT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n" \
       "<|im_start|>assistant\n"  # Qwen2-VL's chat template for one user message, written out
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
# The sampling settings of the Qwen2.5-VL Instruct release (generation_config.json), to exercise the seeded path.
SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


@pytest.fixture(scope="module")
def tiny():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def encoder(tiny):
    return TextEncoder.from_pretrained(tiny, torch.float32, lm_head=True)


@pytest.fixture(scope="module")
def reference(tiny):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny / "text_encoder", dtype=torch.float32).eval()


def reference_expansion(model, tokenizer, prompt, task, seed, max_new_tokens=256, **inputs):
    ids = inputs.pop("input_ids", None)
    if ids is None:
        ids = tokenizer(expand.render(tokenizer, expand.expansion_messages(prompt, task)), return_tensors="pt")[
            "input_ids"]
    transformers.set_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             **inputs)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)[0]


def test_messages_and_chat_rendering(encoder):
    tok = encoder.qwen_tokenizer
    assert tok.chat_template is None  # the tiny tokenizer has none: Qwen2-VL's template applies
    for task, image in [("t2v", ""), ("t2i", ""), ("i2v", "before"), ("i2i", "after")]:
        text = expand.INSTRUCTIONS[task].replace("{prompt}", "A {b} c")  # braces in a prompt stay as they are
        user = VISION + text if image == "before" else text + VISION if image == "after" else text
        assert expand.render(tok, expand.expansion_messages("A {b} c", task)) == CHAT.format(user)
        assert f'Rewrite Prompt: "A {{b}} c"' in text
    with pytest.raises(ValueError, match="task 'v2v' is not one of t2v, i2v, t2i, i2i"):
        expand.expansion_messages(PROMPT, "v2v")


def test_checkpoint_chat_template_is_used(tiny, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny / "tokenizer", tmp_path / "tokenizer")
    template = "[{% for c in messages[0]['content'] %}{{ c['text'] }}{% endfor %}]"
    (tmp_path / "tokenizer" / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert expand.render(tok, expand.expansion_messages("x", "t2i")) == "[" + expand.T2I_INSTRUCTION.replace(
        "{prompt}", "x") + "]"


@pytest.mark.parametrize("task, seed", [("t2v", 3), ("t2i", 4)])
def test_greedy_expansion_equals_reference_generate(encoder, reference, task, seed):
    assert not encoder.generation_config.do_sample  # the tiny checkpoint's config: greedy (transformers' default)
    got = expand.expand_prompt(encoder, PROMPT, task, seed)
    assert got == reference_expansion(reference, encoder.qwen_tokenizer, PROMPT, task, seed)
    assert len(got) > 100 and got == expand.expand_prompt(encoder, PROMPT, task, seed)


def test_seeded_sampling_equals_reference_and_keeps_global_rng(encoder, reference):
    saved = encoder.generation_config, reference.generation_config
    encoder.generation_config = GenerationConfig(**{**saved[0].to_dict(), **SAMPLING})
    encoder._generator = None
    reference.generation_config = GenerationConfig(**{**saved[1].to_dict(), **SAMPLING})
    try:
        torch.manual_seed(123)
        state = torch.get_rng_state()
        got = expand.expand_prompt(encoder, PROMPT, "t2v", 5, max_new_tokens=64)
        assert torch.equal(torch.get_rng_state(), state)  # the expansion seeds its own draws
        assert got == expand.expand_prompt(encoder, PROMPT, "t2v", 5, max_new_tokens=64)
        want = reference_expansion(reference, encoder.qwen_tokenizer, PROMPT, "t2v", 5, max_new_tokens=64)
        assert got == want and len(got) > 50
    finally:
        (encoder.generation_config, reference.generation_config), encoder._generator = saved, None


def test_generation_shares_the_encoder_weights(encoder, tiny):
    from safetensors import safe_open

    model = encoder._generation_model()
    assert model.model.language_model is encoder.qwen and model.lm_head is encoder.lm_head
    own = {p.data_ptr() for p in encoder.qwen.parameters()} | {encoder.lm_head.weight.data_ptr()}
    assert {p.data_ptr() for p in model.parameters()} == own  # nothing else: no second copy, nothing on meta
    with safe_open(str(tiny / "text_encoder" / "model.safetensors"), "pt") as f:
        assert torch.equal(encoder.lm_head.weight, f.get_tensor("lm_head.weight"))
        assert not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))


class Processor(Qwen2_5_VLProcessor):
    """The reference's processor class, without its class check (it wants torchvision's video processor)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return type(argument)


def test_image_expansion_equals_reference_generate(encoder, reference, tiny):
    """I2V and I2I: messages with the image, processor, generate, as text_embedders.py / i2i_pipeline.py run them,
    against k5's expansion with the vision tower of engine/encoders/vision.py (loaded on first use)."""
    from PIL import Image

    from k5.engine.checkpoints.qwen import load_image_processor

    tok = encoder.qwen_tokenizer
    proc = Processor(image_processor=load_image_processor(tiny / "tokenizer"), tokenizer=tok,
                     chat_template=expand.QWEN2_VL_CHAT_TEMPLATE)
    g = torch.Generator().manual_seed(0)
    big = Image.fromarray((torch.rand(256, 384, 3, generator=g) * 255).to(torch.uint8).numpy())
    small = big.resize((96, 64))
    for task, ours_in, ref_in in [("i2v", small, small), ("i2i", big, big.resize((384 // 4, 256 // 4)))]:
        instruction = {"type": "text", "text": expand.INSTRUCTIONS[task].format(prompt=PROMPT)}
        image = {"type": "image", "image": ref_in}
        content = [image, instruction] if task == "i2v" else [instruction, image]
        text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                        add_generation_prompt=True)
        inputs = proc(text=[text], images=[ref_in], padding=True, return_tensors="pt")
        assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]  # 64x96 -> 56x84: 4x6 patches of 14, 6 tokens
        transformers.set_seed(7)
        with torch.no_grad():
            out = reference.generate(**inputs, max_new_tokens=256)
        want = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)[0]
        got = expand.expand_prompt_with_image(encoder, PROMPT, ours_in, task, seed=7)
        assert got == want and len(got) > 100, task
        assert got != expand.expand_prompt(encoder, PROMPT, "t2v", 7)  # the image and the instruction matter
    assert encoder.vision is not None


def test_pipeline_encodes_the_expansion(tiny, encoder):
    pipe = Kandinsky5Pipeline.from_pretrained(tiny, torch.float32, expand=True)
    req = Request(prompt=PROMPT, height=64, width=64, num_frames=1, steps=1, seed=11)
    expanded = pipe.expand_prompt(req)
    assert expanded == expand.expand_prompt(encoder, PROMPT, "t2v", 11)
    seen = []
    encode = pipe.text.encode
    pipe.text.encode = lambda prompts: seen.append(list(prompts)) or encode(prompts)
    pipe.generate(req, prompt=expanded)
    assert seen == [[expanded, req.negative_prompt]]
    with pytest.raises(ValueError, match="prompt expansion for i2v needs the image"):
        pipe.expand_prompt(req, task="i2v")
    plain = Kandinsky5Pipeline.from_pretrained(tiny, torch.float32, dit=pipe.dit, text=pipe.text)
    with pytest.raises(RuntimeError, match="build the pipeline with expand=True"):
        plain.expand_prompt(req)


def test_pipelines_expand_with_their_task(tiny, encoder, tmp_path):
    from PIL import Image

    from k5.engine.pipelines.image_request import ImageRequest
    from k5.engine.pipelines.image import ImagePipeline

    path = tmp_path / "frame.png"
    Image.fromarray((torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
                    .numpy()).save(path)
    pipe = Kandinsky5Pipeline(tiny, dit=None, text=encoder, vae=None, device="cpu")  # expansion needs no DiT/VAE
    pipe.expander = make_expander(encoder)
    req = Request(prompt=PROMPT, image=str(path), seed=2)
    with Image.open(path) as im:
        assert pipe.expand_prompt(req) == expand.expand_prompt_with_image(encoder, PROMPT, im.convert("RGB"), "i2v", 2)
    t2i = tiny_checkpoint(kind="t2i")
    image_pipe = ImagePipeline.from_pretrained(t2i, torch.float32, expand=True)
    got = image_pipe.expand_prompt(ImageRequest(prompt=PROMPT, seed=3))
    assert got == expand.expand_prompt(image_pipe.text, PROMPT, "t2i", 3) and len(got) > 100


def _shared_worker(rank, world_size, tiny):
    from k5.parallel.plan import setup_parallel

    pipe = setup_parallel(tiny, ulysses=world_size, dtype=torch.float32, expand=True, keep_text=True).pipeline
    calls, inner = [], pipe.expander
    pipe.expander = lambda *a: calls.append(a) or inner(*a)
    text = pipe.expand_prompt(Request(prompt=PROMPT, seed=11))
    # The source's expansion fails: every rank of the item group must raise, none may wait.
    pipe.expander = lambda *a: (_ for _ in ()).throw(OSError("disk on fire"))
    try:
        pipe.expand_prompt(Request(prompt=PROMPT, seed=11))
        error = None
    except Exception as e:  # noqa: BLE001 - returned to the test
        error = f"{type(e).__name__}: {e}"
    return text, calls, error


def test_expansion_runs_once_per_item_and_is_shared(tiny, encoder):
    want = expand.expand_prompt(encoder, PROMPT, "t2v", 11)
    results = run_distributed(_shared_worker, 2, tiny)
    assert [r[0] for r in results] == [want, want]
    assert [len(r[1]) for r in results] == [1, 0]  # generated on rank 0 only
    assert results[0][2] == "OSError: disk on fire"
    assert results[1][2] == "RuntimeError: prompt expansion failed on the item group's rank 0: OSError: disk on fire"
