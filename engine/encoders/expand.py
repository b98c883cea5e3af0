"""Prompt expansion ("beautifier"): the reference rewrites the user's prompt with Qwen2.5-VL before encoding it.

The instruction texts are the reference's constants, byte for byte (kandinskylab/kandinsky-5: t2v_pipeline.py
``expand_prompt``, models/text_embedders.py ``INSTRUCTION_I2V_EXPAND``, t2i_pipeline.py and i2i_pipeline.py
``expand_prompt``), typos, indentation and all: the model was tuned with them. The rest follows the reference too:
one user message (I2V: the image, then the text; I2I: the text, then the image) rendered with the Qwen2-VL chat
template and a generation prompt, ``generate(max_new_tokens=256)`` with the checkpoint's generation settings, after
``transformers.set_seed(seed)`` with the item's seed, and the new tokens decoded without special tokens. The decoder
is the text encoder's own (engine.encoders.text.TextEncoder.generate), so the 7B weights are held once.

The reference runs the expansion on rank 0 and broadcasts the text; k5 does the same per item
(k5.parallel.text_share.share_expansion).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

MAX_NEW_TOKENS = 256  # the reference's generate(max_new_tokens=256)

# t2v_pipeline.py, Kandinsky5T2VPipeline.expand_prompt (an f-string in a method body: 8-space indents kept).
T2V_INSTRUCTION = """You are a prompt beautifier that transforms short user video descriptions into rich, detailed English prompts specifically optimized for video generation models.
        Here are some example descriptions from the dataset that the model was trained:
        1. "In a dimly lit room with a cluttered background, papers are pinned to the wall and various objects rest on a desk. Three men stand present: one wearing a red sweater, another in a black sweater, and the third in a gray shirt. The man in the gray shirt speaks and makes hand gestures, while the other two men look forward. The camera remains stationary, focusing on the three men throughout the sequence. A gritty and realistic visual style prevails, marked by a greenish tint that contributes to a moody atmosphere. Low lighting casts shadows, enhancing the tense mood of the scene."
        2. "In an office setting, a man sits at a desk wearing a gray sweater and seated in a black office chair. A wooden cabinet with framed pictures stands beside him, alongside a small plant and a lit desk lamp. Engaged in a conversation, he makes various hand gestures to emphasize his points. His hands move in different positions, indicating different ideas or points. The camera remains stationary, focusing on the man throughout. Warm lighting creates a cozy atmosphere. The man appears to be explaining something. The overall visual style is professional and polished, suitable for a business or educational context."
        3. "A person works on a wooden object resembling a sunburst pattern, holding it in their left hand while using their right hand to insert a thin wire into the gaps between the wooden pieces. The background features a natural outdoor setting with greenery and a tree trunk visible. The camera stays focused on the hands and the wooden object throughout, capturing the detailed process of assembling the wooden structure. The person carefully threads the wire through the gaps, ensuring the wooden pieces are securely fastened together. The scene unfolds with a naturalistic and instructional style, emphasizing the craftsmanship and the methodical steps taken to complete the task."
        IImportantly! These are just examples from a large training dataset of 200 million videos.
        Rewrite Prompt: "{prompt}" to get high-quality video generation. Answer only with expanded prompt."""  # noqa: E501

# models/text_embedders.py, Qwen2_5_VLTextEmbedder.INSTRUCTION_I2V_EXPAND (a class attribute: 4-space indents).
I2V_INSTRUCTION = """You are a prompt beautifier that transforms short user video descriptions into rich, detailed English prompts specifically optimized for video generation models.
    Here are some example descriptions from the dataset that the model was trained:
    1. "Create a video showing a nighttime urban driving scene from inside a car. The driver is focused on the road ahead, with the city lights visible through the windshield. The GPS device on the dashboard continues to display navigation information. The camera remains steady, capturing the interior of the car and the changing street view outside as the vehicle moves forward. The background shifts slightly to show different parts of the cityscape, including illuminated buildings and street signs."
    2. "Create a video where the character, dressed in historical attire, is seen holding an umbrella with a logo. The character should move closer to the camera while maintaining a steady pace, keeping the umbrella raised. The background remains consistent with a foggy, outdoor setting, but the focus shifts more towards the character as they approach. The lighting should emphasize the details of the costume and the umbrella, enhancing the dramatic effect."
    3. "Darken the scene while keeping the characters and setting unchanged, emphasizing a serious atmosphere."
    IImportantly! These are just examples from a large training dataset of 20 mln videos.
    Rewrite Prompt: "{prompt}" to get high-quality image to video generation from this image. Pay main attention to information about changes of objects.
    Make prompt dynamic. Answer only with expanded prompt."""  # noqa: E501

# t2i_pipeline.py, Kandinsky5T2IPipeline.expand_prompt (8-space indents; "user’s" with U+2019).
T2I_INSTRUCTION = """Rewrite and enhance the original prompt with richer detail, clearer structure, and improved descriptive quality. Expand the scene, atmosphere, and context while preserving the user\u2019s intent. When adding text that should appear inside an image, place that text inside double quotes and in capital letters. Strengthen visual clarity, style, and specificity, but do not change the meaning. Output only the enhanced prompt, written in polished, vivid language suitable for high-quality image generation.
        example:
        Original text: white mini police car with blue stripes, with 911 and 'Police' text 
        Result: A miniature model car simulating the official transport of the relevant authorities. The body is white with blue stripes. The word "911" is written in large blue letters on the hood and side. Below it, "POLICE" is used in a font. The windows are transparent, and the interior has black seats. The headlights have plastic lenses, and the roof has blue and red beacons. The radiator grille has vertical slots. The wheels are black with white rims. The doors are closed, the windows have black frames. The background is uniform white.
        Here 911 in double quotes because it is text on image, 'Police' -> "POLICE" because it should be in double quotes and capital letters.
        Rewrite Prompt: "{prompt}". Answer only with expanded prompt."""  # noqa: E501, W291

# i2i_pipeline.py, Kandinsky5I2IPipeline.expand_prompt (no indents; "potision" and the double space as written).
I2I_INSTRUCTION = """Rewrite and enhance the original editing instruction with richer detail, clearer structure, and improved descriptive quality. When adding text that should appear inside an image, place that text inside double quotes and in capital letters. Explain what needs to be changed and what needs to be left unchanged. Explain in details how to change  camera potision or tell that camera position shouldn't be changed.
example:
Original text: add text 911 and 'Police' 
Result: Add the word "911" in large blue letters to the hood. Below that, add the word "POLICE." Keep the camera position unchanged, as do the background, car position, and lighting.
Rewrite Prompt: "{prompt}". Answer only with expanded prompt."""  # noqa: E501, W291

INSTRUCTIONS = {"t2v": T2V_INSTRUCTION, "i2v": I2V_INSTRUCTION, "t2i": T2I_INSTRUCTION, "i2i": I2I_INSTRUCTION}
IMAGE_TASKS = {"i2v": "before", "i2i": "after"}  # where the image goes in the user message, as in the reference

# The chat template of the Qwen2-VL / Qwen2.5-VL Instruct processors (chat_template.json), for tokenizers saved
# without one; a checkpoint's own template is used when it has one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def expansion_messages(prompt: str, task: str) -> list[dict]:
    """The reference's chat messages for ``task`` (t2v, i2v, t2i, i2i); an image task has an image entry (its pixels
    go to the model separately)."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"prompt expansion task {task!r} is not one of {', '.join(INSTRUCTIONS)}")
    content = [{"type": "text", "text": INSTRUCTIONS[task].format(prompt=prompt)}]
    where = IMAGE_TASKS.get(task)
    if where == "before":
        content.insert(0, {"type": "image"})
    elif where == "after":
        content.append({"type": "image"})
    return [{"role": "user", "content": content}]


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, else the processor's (chat_template.json / .jinja beside the tokenizer files,
    where the Qwen2.5-VL repos keep it), else Qwen2-VL's."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return QWEN2_VL_CHAT_TEMPLATE


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), tokenize=False,
                                         add_generation_prompt=True)


def _decode(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids[0].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def expand_prompt(encoder, prompt: str, task: str = "t2v", seed: int = 0, max_new_tokens: int | None = None) -> str:
    """The reference's expansion of ``prompt`` for a text-only task (t2v, t2i) with the encoder's Qwen2.5-VL."""
    if task in IMAGE_TASKS:
        raise ValueError(f"task {task} expands with the image: use expand_prompt_with_image")
    tok = encoder.qwen_tokenizer
    ids = tok(render(tok, expansion_messages(prompt, task)), return_tensors="pt")["input_ids"]
    return _decode(tok, encoder.generate(ids, max_new_tokens or MAX_NEW_TOKENS, seed))


def expand_prompt_with_image(encoder, prompt: str, image, task: str = "i2v", seed: int = 0,
                             max_new_tokens: int | None = None) -> str:
    """The reference's expansion for an image task: i2v (the image, then the instruction) or i2i (the instruction,
    then the image, shrunk first to a quarter of its width and height as the reference does). ``image``: a PIL
    image (RGB) or an HxWx3 uint8 array. The encoder's vision tower (engine.encoders.vision) is loaded on first use."""
    from PIL import Image

    if task not in IMAGE_TASKS:
        raise ValueError(f"task {task} has no image: use expand_prompt")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if task == "i2i":
        image = image.resize((image.width // 4, image.height // 4))  # i2i_pipeline.py expand_prompt
    vision = encoder._load_vision()
    tok = encoder.qwen_tokenizer
    inputs = vision.inputs(tok, render(tok, expansion_messages(prompt, task)), image)
    ids = inputs.pop("input_ids")
    mm_types = (ids == vision.image_token_id).int()  # marks the image tokens for Qwen's 3D RoPE positions
    out = encoder.generate(ids, max_new_tokens or MAX_NEW_TOKENS, seed, mm_token_type_ids=mm_types, **inputs)
    return _decode(tok, out)
