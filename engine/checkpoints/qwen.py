"""The text encoders' checkpoint: Qwen2.5-VL (``text_encoder/``: its text decoder, its language-model head for prompt
expansion, its vision tower for image prompts), CLIP (``text_encoder_2/``) and their tokenizers.

Each Qwen part is built on the meta device and filled straight from the safetensors with only its own tensors (key
patterns: engine/checkpoints/state_dict.py), so the parts of the 7B checkpoint a run does not use are never read
and loading never materialises random weights. engine/encoders/text.py and vision.py run what is loaded here.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from safetensors import safe_open

from k5.engine.checkpoints.files import WEIGHT_FILES, weight_files
from k5.engine.checkpoints.state_dict import (QWEN_LM_HEAD, QWEN_TEXT, QWEN_TEXT_HINT, QWEN_VISION,
                                              QWEN_VISION_HINT)

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json, for checkpoints whose tokenizer folder has none.
QWEN25_VL_MAX_PIXELS = 12845056


def component_dir(folder: Path, name: str) -> Path:
    path = Path(folder) / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"component '{name}' missing: expected folder {path} in the diffusers-format checkpoint {folder} "
            f"(a text pipeline needs {', '.join(TEXT_COMPONENTS)})"
        )
    return path


def _files(path: Path) -> list[Path]:
    try:
        return weight_files(path, *WEIGHT_FILES["text_encoder"])
    except ValueError as e:
        raise ValueError(f"component 'text_encoder' in {path.parent}: {e}") from None


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' own progress bars off for the block (its "Loading weights" bar of every from_pretrained, its
    "Writing model shards" bar of every save): a run shows the launcher's progress, not a library's."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def fill_from_safetensors(module: torch.nn.Module, path: Path, key: re.Pattern, dtype: torch.dtype,
                          device: torch.device, what: str, hint: str) -> None:
    """Fill ``module`` (built on the meta device) from the text encoder's safetensors in ``path``: every tensor whose
    name matches ``key`` (group 1: the module's own name) and that the module has. Nothing else is read, so the
    parts of the 7B checkpoint a caller does not build are never materialised. Raises ValueError naming the file or
    the weights that are missing."""
    expected = set(module.state_dict().keys())
    state = {}
    for file in _files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    m = key.match(name)
                    if m and m.group(1) in expected:
                        state[m.group(1)] = f.get_tensor(name).to(dtype)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"component 'text_encoder' in {path.parent}: cannot read {file}: {e}") from e
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(f"component 'text_encoder' in {path.parent}: {len(missing)} {what} weights not found "
                         f"(first: {missing[:3]}); {hint}")
    module.load_state_dict(state, strict=False, assign=True)


def _config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the component named
        raise ValueError(f"component 'text_encoder' in {path.parent}: cannot read {path / 'config.json'}: {e}") from e


def load_text_decoder(path: Path, dtype: torch.dtype, device: torch.device):
    """Qwen2.5-VL's text decoder (``Qwen2_5_VLTextModel``) from ``text_encoder/``; ``.full_config`` is the whole
    Qwen2_5_VLConfig (text + vision), for generation."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, Qwen2_5_VLTextModel

    config = _config(path)
    text_config = getattr(config, "text_config", None)
    if text_config is None:
        raise ValueError(
            f"component 'text_encoder' in {path.parent}: config model_type={config.model_type!r} has no text_config; "
            "expected a Qwen2_5_VLForConditionalGeneration checkpoint"
        )
    with torch.device("meta"):
        model = Qwen2_5_VLTextModel(text_config)
    fill_from_safetensors(model, path, QWEN_TEXT, dtype, device, "text-decoder", QWEN_TEXT_HINT)
    # RoPE frequencies are non-persistent fp32 buffers: rebuild them for real instead of leaving them on meta.
    model.rotary_emb = Qwen2_5_VLRotaryEmbedding(text_config).to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"text decoder tensors left unloaded on the meta device: {left}"
    model.full_config = config
    return model.eval().requires_grad_(False)


def _ties_head(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False)
                or getattr(getattr(config, "text_config", None), "tie_word_embeddings", False))


def _no_head(path: Path) -> ValueError:
    return ValueError(
        f"component 'text_encoder' in {path.parent}: no {QWEN_LM_HEAD} in {path} and the config does not tie it "
        "to the input embeddings; prompt expansion needs the language-model head (or use --no-expand-prompt)"
    )


def load_lm_head(path: Path, qwen, dtype: torch.dtype, device: torch.device) -> torch.nn.Linear:
    """The language-model head: `lm_head.weight` of the checkpoint (Qwen2.5-VL-7B keeps it separate), or the input
    embedding itself when the config ties them (the 3B) and the checkpoint has no head."""
    head = torch.nn.Linear(qwen.config.hidden_size, qwen.config.vocab_size, bias=False, device="meta")
    for file in _files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            if QWEN_LM_HEAD in f.keys():
                head.weight = torch.nn.Parameter(f.get_tensor(QWEN_LM_HEAD).to(dtype), requires_grad=False)
                return head
    if not (_ties_head(qwen.full_config) or getattr(qwen.config, "tie_word_embeddings", False)):
        raise _no_head(path)
    head.weight = qwen.embed_tokens.weight  # shared, not copied
    return head


def check_lm_head(checkpoint) -> None:
    """Raise ValueError unless the checkpoint's text encoder can generate (prompt expansion): an ``lm_head.weight``
    among its tensors (the headers the ``Checkpoint`` read), or a config that ties the head to the input
    embeddings (load_lm_head's rule)."""
    if checkpoint.holds("text_encoder", QWEN_LM_HEAD):
        return
    path = component_dir(checkpoint.root, "text_encoder")
    if not _ties_head(_config(path)):
        raise _no_head(path)


def load_tokenizer(path: Path, name: str):
    from transformers import AutoTokenizer

    try:
        # Only the tokenizer of the Qwen2VLProcessor folder: the image/video processors are never needed.
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"component '{name}' in {path.parent}: cannot load a tokenizer from {path}: {e}") from e


def load_generation_config(path: Path, config):
    """The checkpoint's generation_config.json (what transformers' from_pretrained loads for generate), else the
    settings derived from the model config (greedy)."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            return GenerationConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"component 'text_encoder' in {path.parent}: cannot read generation_config.json: {e}")
    return GenerationConfig.from_model_config(config)


def load_clip(folder: Path, device: torch.device):
    """CLIP's text tower from ``text_encoder_2/``, fp32 whatever the compute dtype: the original loads it with
    from_pretrained's default (fp32) next to its bf16 Qwen, and its pooled vector reaches the DiT in fp32 (0.5 GB
    for ViT-L's text tower; in bf16 the pooled vector is off by ~1e-2 relative)."""
    from transformers import CLIPTextModel

    clip_dir = component_dir(folder, "text_encoder_2")
    try:
        with quiet_progress_bars():
            clip = CLIPTextModel.from_pretrained(clip_dir, dtype=torch.float32).to(device)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"component 'text_encoder_2' in {folder}: cannot load CLIPTextModel from {clip_dir}: {e}"
        ) from e
    return clip.eval().requires_grad_(False)


def load_image_processor(tokenizer_dir: Path):
    """The checkpoint's Qwen2-VL image processor settings (tokenizer/preprocessor_config.json), PIL backend."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if (tokenizer_dir / "preprocessor_config.json").is_file():
        try:
            return Qwen2VLImageProcessorPil.from_pretrained(tokenizer_dir)
        except Exception as e:  # noqa: BLE001 - re-raised with the component named
            raise ValueError(
                f"component 'tokenizer' in {tokenizer_dir.parent}: cannot read {tokenizer_dir}/preprocessor_config.json"
                f": {e}"
            ) from e
    return Qwen2VLImageProcessorPil(max_pixels=QWEN25_VL_MAX_PIXELS)


def load_vision_tower(path: Path, dtype: torch.dtype, device: torch.device):
    """(the Qwen2_5_VLConfig, the vision tower) from ``text_encoder/``."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionRotaryEmbedding)

    config = _config(path)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        raise ValueError(
            f"component 'text_encoder' in {path.parent}: config model_type={config.model_type!r} has no vision_config; "
            "image editing needs the Qwen2.5-VL vision tower (a Qwen2_5_VLForConditionalGeneration checkpoint)"
        )
    with torch.device("meta"):
        tower = Qwen2_5_VisionTransformerPretrainedModel(vision_config)
    fill_from_safetensors(tower, path, QWEN_VISION, dtype, device, "vision-tower", QWEN_VISION_HINT)
    # Non-persistent fp32 RoPE frequencies: rebuilt for real, as for the text decoder.
    tower.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(vision_config).to(device)
    left = [n for n, t in [*tower.named_parameters(), *tower.named_buffers()] if t.is_meta]
    assert not left, f"vision tower tensors left unloaded on the meta device: {left}"
    return config, tower.eval().requires_grad_(False)
