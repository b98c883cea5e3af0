"""Every checkpoint key name k5 knows, by format: how a stored tensor name maps to the model's, and what a config-less
single file's shapes say about its config. The rest of the package never spells a stored key.

DiT formats (``DiTFormat``: config reader, config from shapes, stored name -> model name):
- Kandinsky 5 (``K5``): the diffusers and the original layout use the DiT's own module names
  (kandinsky5-architecture.md section 2.9), so names map to themselves; the original single files carry no config.
- Kandinsky 6 (``K6``) and its super-resolution DiT (``K6_SR``): the diffusers layout renames a few families. The
  rules come from the ComfyUI node of kandinskylab (``_DIFFUSERS_PREFIXES`` / ``_DIFFUSERS_INNER_NAMES``, "both the
  original export and the current HF Diffusers layout use the same tensors"), vLLM-Omni's test of the published
  bundles (an older export spells the stream blocks ``visual_transformer_blocks.N.videoT``) and kandinsky-6-sr's
  ``checkpoint_keys.py``. No original Kandinsky 6 file was available to check against: the diffusers layout is the one
  the tests load. Their single files' configs are rebuilt with the release constants the ComfyUI node uses (axes
  split head/4, 3/8, 3/8; audio RoPE scaling 0.144; ca_rope and fix_modulation on; cross_gates read off the
  va_modulation width).

Text encoder (Qwen2.5-VL ``text_encoder/``): ``QWEN_TEXT`` and ``QWEN_VISION`` pick the decoder's and the vision
tower's tensors out of the full checkpoint, in both of its save layouts.

LoRA files: ``LORA_FACTOR``, ``LORA_ALPHA``, ``LORA_PREFIXES`` and ``LORA_UNSUPPORTED`` read the key conventions of
diffusers, peft, kohya and the official Kandinsky 5 LoRA repos (engine/checkpoints/lora.py says which is which).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from k5.engine.model.config import DiTConfig
from k5.engine.model.k6_config import K6Config, SRConfig


@dataclass(frozen=True)
class DiTFormat:
    """One DiT's checkpoint layout."""

    name: str  # for messages: "a Kandinsky 5 checkpoint"
    read_config: Callable  # config.json path -> config
    infer_config: Callable[[dict], object]  # {model name: shape} of a single file -> config
    model_name: Callable[[str], str] | None = None  # stored name -> model name; None: the same

    def renamed(self, stored: list[str], where) -> dict[str, str]:
        """model name -> stored name; two stored tensors that land on one model name are refused."""
        if self.model_name is None:
            return {s: s for s in stored}
        names: dict[str, str] = {}
        for s in stored:
            n = self.model_name(s)
            if n in names:
                raise ValueError(f"{where} holds both {names[n]} and {s}, two names of the one tensor {n}: "
                                 f"a checkpoint mixes two layouts")
            names[n] = s
        return names


# ---- Kandinsky 5 ---------------------------------------------------------------------------------------------------

# The original single-file checkpoints carry no config; the head dim is visible in the q/k norm weights and the
# RoPE split of it is fixed per family (kandinsky5-architecture.md section 1.1).
AXES_BY_HEAD_DIM = {64: (16, 24, 24), 128: (32, 48, 48)}


def _count(shapes: dict, prefix: str) -> int:
    return len({k.split(".")[1] for k in shapes if k.startswith(prefix + ".")})


def infer_k5_config(shapes: dict[str, tuple[int, ...]]) -> DiTConfig:
    """Rebuild the config of an original single-file Kandinsky 5 checkpoint from its tensor shapes."""
    try:
        model_dim, in_text_dim = shapes["text_embeddings.in_layer.weight"]
        time_dim, in_text_dim2 = shapes["pooled_text_embeddings.in_layer.weight"]
        _, patch_in = shapes["visual_embeddings.in_layer.weight"]
        out_features, _ = shapes["out_layer.out_layer.weight"]
        ff_dim, _ = shapes["visual_transformer_blocks.0.feed_forward.in_layer.weight"]
        (head_dim,) = shapes["visual_transformer_blocks.0.self_attention.query_norm.weight"]
    except KeyError as e:
        raise ValueError(f"not a Kandinsky 5 DiT checkpoint: tensor {e.args[0]} is missing") from None
    if head_dim not in AXES_BY_HEAD_DIM:
        raise ValueError(
            f"head_dim {head_dim} matches no known Kandinsky 5 model (64: Lite, 128: Pro/Image); put a config.json "
            f"with axes_dims beside the checkpoint"
        )
    patch = 4  # (1, 2, 2) in every released model
    out_dim = out_features // patch
    in_channels = patch_in // patch
    return DiTConfig(
        in_visual_dim=out_dim, out_visual_dim=out_dim, in_text_dim=in_text_dim, in_text_dim2=in_text_dim2,
        time_dim=time_dim, model_dim=model_dim, ff_dim=ff_dim,
        num_text_blocks=_count(shapes, "text_transformer_blocks"),
        num_visual_blocks=_count(shapes, "visual_transformer_blocks"),
        axes_dims=AXES_BY_HEAD_DIM[head_dim], visual_cond=in_channels == 2 * out_dim + 1,
    )


K5 = DiTFormat("Kandinsky 5", DiTConfig.from_json, infer_k5_config)


# ---- Kandinsky 6 and its SR model -----------------------------------------------------------------------------

# (stored, ours) substrings; prefixes first, then names inside a block.
_K6_PREFIXES = (("visual_transformer_blocks.", "visual_blocks."), ("audio_out_layer.", "audio_outLayer."))
_K6_INNER = (
    (".timestep_embedder.linear_1.", ".in_layer."),
    (".timestep_embedder.linear_2.", ".out_layer."),
    (".video_dec_block.", ".videoT."),
    (".audio_dec_block.", ".audioT."),
    (".feed_forward.net.0.proj.", ".feed_forward.in_layer."),
    (".feed_forward.net.2.", ".feed_forward.out_layer."),
    (".attn.", ".self_attention."),  # the text blocks' self-attention
)
_K6_SR_INNER = (
    ("time_embeddings.timestep_embedder.linear_1.", "time_embeddings.in_layer."),
    ("time_embeddings.timestep_embedder.linear_2.", "time_embeddings.out_layer."),
    (".feed_forward.net.0.proj.", ".feed_forward.in_layer."),
    (".feed_forward.net.2.", ".feed_forward.out_layer."),
)


def k6_model_name(stored: str) -> str:
    """The K6 DiT's name for a tensor stored under ``stored`` (diffusers or original layout); idempotent."""
    name = stored
    for source, target in _K6_PREFIXES:
        if name.startswith(source):
            name = target + name[len(source):]
            break
    for source, target in _K6_INNER:
        name = name.replace(source, target)
    return name


def k6_sr_model_name(stored: str) -> str:
    name = stored
    for source, target in _K6_SR_INNER:
        name = name.replace(source, target)
    return name


def _k6_axes(head_dim: int) -> tuple[int, int, int]:
    # The release split of a head (16, 24, 24 of 64; 32, 48, 48 of 128): the ComfyUI node's rule
    return head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8


def infer_k6_config(shapes: dict[str, tuple[int, ...]]) -> K6Config:
    """Rebuild the config of an original single-file K6 checkpoint from its (model-named) tensor shapes."""
    try:
        model_dim, vis_in = shapes["visual_embeddings.in_layer.weight"]
        model_dim_a, in_audio_dim = shapes["audio_embeddings.in_layer.weight"]
        time_dim, in_text_dim2 = shapes["video_pooled_text_embeddings.in_layer.weight"]
        time_dim_a = shapes["audio_pooled_text_embeddings.in_layer.weight"][0]
        in_text_dim = shapes["video_text_embeddings.in_layer.weight"][1]
        out_visual = shapes["out_layer.out_layer.weight"][0]
        out_audio_dim = shapes["audio_outLayer.out_layer.weight"][0]
        ff_dim = shapes["visual_blocks.0.videoT.feed_forward.in_layer.weight"][0]
        ff_dim_a = shapes["visual_blocks.0.audioT.feed_forward.in_layer.weight"][0]
        (head_dim,) = shapes["visual_blocks.0.videoT.self_attention.query_norm.weight"]
        (head_dim_a,) = shapes["visual_blocks.0.audioT.self_attention.query_norm.weight"]
        va = shapes["visual_blocks.0.va_modulation.out_layer.weight"][0]
    except KeyError as e:
        raise ValueError(f"not a Kandinsky 6 DiT checkpoint: tensor {e.args[0]} is missing") from None
    patch = 4  # (1, 2, 2) in every release
    in_channels = vis_in // patch
    in_visual_dim = (in_channels - 1) // 2 if in_channels % 2 else in_channels
    token_types = shapes.get("visual_token_type_embeddings.weight", (0,))[0]
    return K6Config(
        in_visual_dim=in_visual_dim, out_visual_dim=out_visual // patch, in_text_dim=in_text_dim,
        in_text_dim2=in_text_dim2, time_dim=time_dim, model_dim=model_dim, ff_dim=ff_dim,
        num_text_blocks=_count(shapes, "video_text_transformer_blocks"),
        num_visual_blocks=_count(shapes, "visual_blocks"), axes_dims=_k6_axes(head_dim),
        visual_cond=in_channels == 2 * in_visual_dim + 1, in_audio_dim=in_audio_dim, out_audio_dim=out_audio_dim,
        model_dim_a=model_dim_a, time_dim_a=time_dim_a, ff_dim_a=ff_dim_a, axes_dims_a=_k6_axes(head_dim_a),
        audio_freqs_scaling=0.144, scale_factor=(1.0, 2.0, 2.0), text_token_padding=True, ca_rope=True,
        cross_gates=va == 2 * model_dim + model_dim_a, fix_modulation=True,
        visual_token_type_num_embeddings=token_types,
    )


def infer_k6_sr_config(shapes: dict[str, tuple[int, ...]]) -> SRConfig:
    try:
        model_dim, vis_in = shapes["visual_embeddings.in_layer.weight"]
        time_dim = shapes["time_embeddings.out_layer.weight"][0]
        out_visual = shapes["out_layer.out_layer.weight"][0]
        ff_dim = shapes["visual_transformer_blocks.0.feed_forward.in_layer.weight"][0]
        (head_dim,) = shapes["visual_transformer_blocks.0.self_attention.query_norm.weight"]
    except KeyError as e:
        raise ValueError(f"not a Kandinsky 6 SR checkpoint: tensor {e.args[0]} is missing") from None
    return SRConfig(in_visual_dim=(vis_in - 1) // 2, out_visual_dim=out_visual, time_dim=time_dim,
                    model_dim=model_dim, ff_dim=ff_dim, num_visual_blocks=_count(shapes, "visual_transformer_blocks"),
                    axes_dims=_k6_axes(head_dim))


K6 = DiTFormat("Kandinsky 6", K6Config.from_json, infer_k6_config, k6_model_name)
K6_SR = DiTFormat("Kandinsky 6 SR", SRConfig.from_json, infer_k6_sr_config, k6_sr_model_name)


# ---- the text encoder (Qwen2.5-VL) --------------------------------------------------------------------------------

# Saved Qwen2_5_VLForConditionalGeneration checkpoints name the text decoder `model.language_model.*`
# (transformers >= 4.52) or `model.*` next to `visual.*` (older saves, e.g. the Qwen2.5-VL-7B-Instruct release);
# group 1 is the decoder module's own name.
QWEN_TEXT = re.compile(r"^model\.(?:language_model\.)?(?!visual\.)(.+)$")
QWEN_TEXT_HINT = "expected keys model.language_model.<name> or model.<name>"
# Legacy saves name the vision tower `visual.*`; transformers >= 4.52 saves `model.visual.*`.
QWEN_VISION = re.compile(r"^(?:model\.)?visual\.(.+)$")
QWEN_VISION_HINT = ("image editing needs the full Qwen2.5-VL checkpoint (keys visual.<name> or "
                    "model.visual.<name>)")
QWEN_LM_HEAD = "lm_head.weight"  # Qwen2.5-VL-7B keeps its head separate; the 3B ties it to the embedding


# ---- LoRA files -------------------------------------------------------------------------------------------------

# Prefixes before the DiT's module name: diffusers (`transformer.`), peft's save_pretrained (`base_model.model.`),
# kohya-style exports of the original code (`diffusion_model.`).
LORA_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")
# <module>.lora_A / lora_B (peft, diffusers) or lora_down / lora_up (kohya), optionally with an adapter-name infix
# (`lora_A.default.weight`).
LORA_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<name>[^.]+))?\.weight$")
LORA_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")  # kohya: one scalar per module
LORA_UNSUPPORTED = [
    (re.compile(r"lora_magnitude_vector|dora_scale"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"\.lora_(B|up)(\.[^.]+)?\.bias$"), "LoRA with a bias on lora_B (lora_bias=True)"),
    (re.compile(r"\.(lokr_|hada_|oft_)"), "LoKr / LoHa / OFT adapters"),
]


def lora_module(key: str) -> str:
    """A LoRA file key without its format's prefix: the DiT module name and the factor/alpha suffix."""
    for prefix in LORA_PREFIXES:
        key = key.removeprefix(prefix)
    return key
