"""A seeded, randomly initialised Kandinsky 5 pipeline in the diffusers folder layout, small enough for CPU.

Three kinds: "video" (T2V/I2V: HunyuanVideo VAE), and the Image Lite pair "t2i" / "i2i" (FLUX-style 2D VAE, a DiT
without / with the edit-latent input, a Qwen2.5-VL whose vision tower is deep enough to have windowed and full
attention blocks, and the Qwen2-VL image processor settings in tokenizer/ as the real repos ship them).

The folder has every component a real `*-Diffusers` repo has (model_index.json, transformer, vae, text_encoder,
tokenizer, text_encoder_2, tokenizer_2, scheduler) with the real structure and compression ratios but tiny widths,
so tests load it through exactly the code path of a real checkpoint. Same seed -> byte-identical folder.

The tokenizers are built locally (no download). The Qwen-style BPE is trained on the prompt template so that the
video template prefix is exactly 129 tokens, as with the real Qwen2.5-VL tokenizer, and diffusers' spelling of the
template ("prompt" for "promt") is 128, matching diffusers' hard-coded crop: both pipelines can serve as oracles.
"""

import collections
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from k5.engine.checkpoints.qwen import quiet_progress_bars
from k5.engine.encoders.text import (DEFAULT_NEGATIVE_PROMPT, IMAGE, IMAGE_EDIT, VIDEO_CROP_START,
                                     VIDEO_PROMPT_TEMPLATE, VIDEO_TEMPLATE_PREFIX)
from k5.kernels.nabla import NABLA_WINDOW

TINY_VERSION = "2"  # bump when the folder content changes, so cached folders are rebuilt
QWEN_HIDDEN = 32
CLIP_HIDDEN = 24  # differs from QWEN_HIDDEN so that a swapped text input fails loudly
DIFFUSERS_CROP_START = 128  # diffusers 0.42 `prompt_template_encode_start_idx` for its "prompt" spelling

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]

# A little ordinary English so that user prompts do not tokenise into bare bytes. "prom" makes "Ġpromt" two tokens
# ("Ġprom" "t") while "Ġprompt" is one, the relation that makes the original crop one more than diffusers'.
_ENGLISH = (
    "A cat walks on the green grass in the park while a dog runs. The sun is shining over the city street at "
    "night; people walk, cars drive, waves crash on the beach. Students dance at the prom. "
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _words(text: str, backend, specials: list[str]) -> list[str]:
    """Pre-tokenised byte-level words exactly as the tokenizer backend will see them (specials split off first)."""
    words = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part and part not in specials:
            normalized = backend.normalizer.normalize_str(part) if backend.normalizer else part
            words += [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    return words


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _train_bpe(word_counts, split, max_merges, probes=()):
    """Plain BPE training; ties broken by the pair itself, so the result never depends on hash order.

    Returns the merges and, after each merge, the token count of every probe word list (same merges applied).
    """
    segs = {w: split(w) for w in word_counts}
    probe_segs = [[split(w) for w in words] for words in probes]
    merges, history = [], []
    for _ in range(max_merges):
        pairs = collections.Counter()
        for w, s in segs.items():
            for pair in zip(s, s[1:]):
                pairs[pair] += word_counts[w]
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        segs = {w: _merge(s, best) for w, s in segs.items()}
        probe_segs = [[_merge(s, best) for s in words] for words in probe_segs]
        history.append([sum(map(len, words)) for words in probe_segs])
    return merges, history


def _vocab(base: list[str], merges, specials: list[str]) -> dict[str, int]:
    vocab = {}
    for token in [*base, *(a + b for a, b in merges), *specials]:
        vocab.setdefault(token, len(vocab))
    return vocab


def _image_tokenizer_plan(words):
    """Image kinds: the image template prefix is 41 tokens (the original's crop) with "promt" and 40 with diffusers'
    "prompt" (its crop), and every word of the edit template's prefix is one token but "promt" (52 tokens: what the
    real tokenizer gives by the same rule; the original crops 55 there, so 3 prompt tokens go, as they would)."""
    prefix, edit_prefix = IMAGE.template.split("{}")[0], IMAGE_EDIT.template.split("{}")[0]
    diffusers_prefix = prefix.replace("promt", "prompt")
    corpus = IMAGE.template.replace("promt", "prompt").format(_ENGLISH + DEFAULT_NEGATIVE_PROMPT)
    corpus += IMAGE_EDIT.template.replace("promt", "prompt").format("")
    probes = (words(prefix), words(diffusers_prefix), words(edit_prefix))
    n_specials = [p.count("<|") for p in (prefix, diffusers_prefix, edit_prefix)]
    target = [IMAGE.crop_start - n_specials[0], IMAGE.crop_start - 1 - n_specials[1], len(probes[2]) + 1]
    return corpus, probes, target


def build_qwen_tokenizer(kind: str = "video"):
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    backend = Qwen2Tokenizer().backend_tokenizer
    words = lambda text: _words(text, backend, QWEN_SPECIALS)  # noqa: E731
    if kind == "video":
        diffusers_prefix = VIDEO_TEMPLATE_PREFIX.replace("promt", "prompt")
        corpus = VIDEO_PROMPT_TEMPLATE.replace("promt", "prompt").format(_ENGLISH + DEFAULT_NEGATIVE_PROMPT)
        n_specials = [p.count("<|") for p in (VIDEO_TEMPLATE_PREFIX, diffusers_prefix)]
        probes = (words(VIDEO_TEMPLATE_PREFIX), words(diffusers_prefix))
        target = [VIDEO_CROP_START - n_specials[0], DIFFUSERS_CROP_START - n_specials[1]]
    else:
        corpus, probes, target = _image_tokenizer_plan(words)
    merges, history = _train_bpe(collections.Counter(words(corpus)), list, 2000, probes=probes)
    # The fewest merges that give the crops: a deterministic search, since the counts only ever go down.
    if target not in history:
        raise RuntimeError(f"no BPE merge count gives the {kind} template prefix lengths {target} (+ specials)")
    merges = merges[: history.index(target) + 1]
    base = [_bytes_to_unicode()[b] for b in range(256)]
    return Qwen2Tokenizer(
        vocab=_vocab(base, merges, QWEN_SPECIALS),
        merges=merges,
        extra_special_tokens=QWEN_SPECIALS[1:],
        model_max_length=131072,
    )


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer
    corpus = " ".join([_ENGLISH, DEFAULT_NEGATIVE_PROMPT, VIDEO_PROMPT_TEMPLATE.format("")])
    split = lambda w: [*w[:-1], w[-1] + "</w>"]  # noqa: E731  (CLIP marks the end of a word)
    merges, _ = _train_bpe(collections.Counter(_words(corpus, backend, CLIP_SPECIALS)), split, 300)
    base = [_bytes_to_unicode()[b] for b in range(256)]
    vocab = _vocab(base + [c + "</w>" for c in base], merges, CLIP_SPECIALS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _reinit_(module: nn.Module, seed: int):
    """Seeded normal init of every parameter, independent of library init order (and not zero anywhere: the
    libraries zero-init the adaLN modulation, which would make equivalence tests pass trivially)."""
    generator = torch.Generator().manual_seed(seed)
    norm_params = {id(p) for m in module.modules() if "Norm" in type(m).__name__ for p in m.parameters(False)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if id(p) in norm_params:
                value = 1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
            elif p.ndim >= 2:
                value = noise / math.sqrt(p[0].numel())  # unit-variance outputs for unit-variance inputs
            else:
                value = 0.1 * noise
            p.copy_(value)
    return module


def _qwen_text_encoder(tokenizer, seed: int, vision_depth: int = 1):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=QWEN_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            # head_dim 8 -> 4 rotary frequencies split over (t, h, w), like [16, 24, 24] for head_dim 128
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        ),
        # The image kinds have 2 blocks: windowed attention, then full attention (the real tower: full every 8th).
        vision_config=dict(
            depth=vision_depth, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=QWEN_HIDDEN,
            fullatt_block_indexes=[vision_depth - 1],
        ),  # fmt: skip
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return _reinit_(Qwen2_5_VLForConditionalGeneration(config), seed)


def _clip_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=CLIP_HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # not the legacy 2, so pooling looks for the first EOS token
        pad_token_id=tokenizer.pad_token_id,
    )
    return _reinit_(CLIPTextModel(config), seed)


def _transformer(attention: str, seed: int, visual_cond: bool = True):
    from diffusers import Kandinsky5Transformer3DModel

    sparse = {}  # "regular" keeps the library defaults (None) for every attention_* field
    if attention == "nabla":
        sparse = dict(
            attention_causal=False, attention_local=False, attention_glob=False, attention_window=3,
            attention_method="topcdf", attention_P=0.9, attention_add_sta=True,
            attention_wT=NABLA_WINDOW[0], attention_wH=NABLA_WINDOW[1], attention_wW=NABLA_WINDOW[2],
        )  # fmt: skip
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=16, out_visual_dim=16, visual_cond=visual_cond, patch_size=(1, 2, 2),
        model_dim=64, ff_dim=128, time_dim=32, axes_dims=(4, 6, 6),  # head_dim 16 -> 4 heads
        num_text_blocks=1, num_visual_blocks=2, in_text_dim=QWEN_HIDDEN, in_text_dim2=CLIP_HIDDEN,
        attention_type=attention, **sparse,
    )  # fmt: skip
    return _reinit_(model, seed)


def _vae(seed: int):
    from diffusers import AutoencoderKLHunyuanVideo

    # Real compression (8x spatial, 4x temporal, 16 latent channels, scaling 0.476986), tiny widths.
    model = AutoencoderKLHunyuanVideo(
        latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )  # fmt: skip
    return _reinit_(model, seed)


def _flux_vae(seed: int):
    from diffusers import AutoencoderKL

    # The FLUX.1-dev VAE's structure and constants (16 latent channels, 8x, no quant convs, scaling 0.3611, shift
    # 0.1159 that Kandinsky ignores), tiny widths. Its mid-block attention is left out: at the 1024-class sizes it is
    # a 16k-token attention that would cost a CPU several seconds per image, and it is library code we do not test.
    model = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
        mid_block_add_attention=False,
    )  # fmt: skip
    return _reinit_(model, seed)


# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (the real diffusers repos keep it in tokenizer/).
QWEN_IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}  # fmt: skip
KINDS = ("video", "t2i", "i2i")


def _write_json(path: Path, data: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_scheduler_and_index(folder: Path, shift: float, pipeline: str, vae: str):
    import diffusers

    _write_json(
        folder / "scheduler" / "scheduler_config.json",
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift},
    )
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": pipeline,
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "text_encoder_2": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "transformer": ["diffusers", "Kandinsky5Transformer3DModel"],
            "vae": ["diffusers", vae],
        },
    )


def build_tiny_checkpoint(folder, seed: int = 0, attention: str = "regular", kind: str = "video") -> Path:
    if attention not in ("regular", "nabla"):
        raise ValueError(f"attention={attention!r}; use 'regular' (dense) or 'nabla'")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use one of {', '.join(KINDS)}")
    if kind != "video" and attention != "regular":
        raise ValueError("Image Lite uses dense attention; build the t2i/i2i tiny checkpoints with attention='regular'")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; build the tiny checkpoint into a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_saves():
        if kind == "video":
            _write_components(folder, seed, attention)
        else:
            _write_image_components(folder, seed, kind)
    return folder


@contextlib.contextmanager
def _quiet_saves():
    """No progress bars, and no deepspeed: transformers' save_pretrained unwraps the model through accelerate, which
    imports deepspeed wherever it is installed (a test peer here) to compare the model with its engine class, and
    deepspeed's import prints "Setting accelerator to CPU" into the first run of a tiny model. A None in sys.modules
    makes find_spec report it absent for the block; transformers and accelerate are imported before it, so what they
    decide at import time is decided with deepspeed visible, as it is everywhere else in the process."""
    import transformers.modeling_utils  # noqa: F401

    hidden = "deepspeed" not in sys.modules
    if hidden:
        sys.modules["deepspeed"] = None
    try:
        with quiet_progress_bars():  # "Writing model shards" bars would flood the test logs
            yield
    finally:
        if hidden and "deepspeed" in sys.modules and sys.modules["deepspeed"] is None:
            del sys.modules["deepspeed"]


def _write_components(folder: Path, seed: int, attention: str):
    qwen_tokenizer, clip_tokenizer = build_qwen_tokenizer(), build_clip_tokenizer()
    qwen_tokenizer.save_pretrained(folder / "tokenizer")
    clip_tokenizer.save_pretrained(folder / "tokenizer_2")
    # Distinct seeds per component, so no two components share weights.
    _transformer(attention, seed * 16 + 0).save_pretrained(folder / "transformer")
    _vae(seed * 16 + 1).save_pretrained(folder / "vae")
    _qwen_text_encoder(qwen_tokenizer, seed * 16 + 2).save_pretrained(folder / "text_encoder")
    _clip_text_encoder(clip_tokenizer, seed * 16 + 3).save_pretrained(folder / "text_encoder_2")
    # As in the real repos, except "tokenizer": they list Qwen2VLProcessor, whose video processor needs torchvision
    # (absent on CPU CI) and which diffusers refuses to swap for a plain tokenizer. Only the tokenizer files are
    # ever read for text, so this keeps `Kandinsky5T2VPipeline.from_pretrained(tiny)` usable as an oracle.
    _write_scheduler_and_index(folder, shift=5.0, pipeline="Kandinsky5T2VPipeline", vae="AutoencoderKLHunyuanVideo")


def _write_image_components(folder: Path, seed: int, kind: str):
    qwen_tokenizer, clip_tokenizer = build_qwen_tokenizer("image"), build_clip_tokenizer()
    qwen_tokenizer.save_pretrained(folder / "tokenizer")
    _write_json(folder / "tokenizer" / "preprocessor_config.json", QWEN_IMAGE_PROCESSOR)
    clip_tokenizer.save_pretrained(folder / "tokenizer_2")
    # Seeds apart from the video kind's (seed * 16 + 0..3), and the same for t2i and i2i except the transformer.
    _transformer("regular", seed * 16 + (4 if kind == "t2i" else 5), visual_cond=kind == "i2i").save_pretrained(
        folder / "transformer"
    )
    _flux_vae(seed * 16 + 6).save_pretrained(folder / "vae")
    _qwen_text_encoder(qwen_tokenizer, seed * 16 + 7, vision_depth=2).save_pretrained(folder / "text_encoder")
    _clip_text_encoder(clip_tokenizer, seed * 16 + 8).save_pretrained(folder / "text_encoder_2")
    # "tokenizer" as for video: a plain tokenizer class, so that diffusers' from_pretrained works without torchvision.
    _write_scheduler_and_index(folder, shift=3.0, vae="AutoencoderKL",
                               pipeline="Kandinsky5T2IPipeline" if kind == "t2i" else "Kandinsky5I2IPipeline")


def tiny_checkpoint(cache_dir=None, seed: int = 0, attention: str = "regular", kind: str = "video") -> Path:
    """Build once per (kind, seed, attention, version of this file and of the libraries), return the cached folder.

    ``kind``: "video" (T2V/I2V), "t2i" or "i2i" (Image Lite)."""
    import diffusers
    import transformers

    cache_dir = Path(cache_dir or os.environ.get("K5_TINY_CACHE") or Path(tempfile.gettempdir()) / "k5-tiny")
    versions = f"v{TINY_VERSION}-torch{torch.__version__}-tf{transformers.__version__}-df{diffusers.__version__}"
    name = f"seed{seed}-{attention}" if kind == "video" else f"{kind}-seed{seed}"
    final = cache_dir / f"{name}-{versions}"
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build aside and rename into place: rename is atomic, so a concurrent process sees nothing or a full folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        build_tiny_checkpoint(tmp, seed=seed, attention=attention, kind=kind)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # another process did not win the race: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
