"""Where the Kandinsky 6 checkpoints' tensor names differ from the model's, and their configs.

The models (engine/model/k6_dit.py, engine/model/k6_sr.py) name their modules as the original Kandinsky code does, as the
Kandinsky 5 DiT does, so they reuse its blocks. The diffusers layout renames a few families; the rules below map a
stored name to the model's, and engine/checkpoints/dit.py reads every tensor through them onto the meta-device model.

Sources of the rules (diffusers itself ships no conversion script for Kandinsky 6, so neither layout's mapping is
documented there): the ComfyUI node of kandinskylab (`_DIFFUSERS_PREFIXES` / `_DIFFUSERS_INNER_NAMES`, "both the
original export and the current HF Diffusers layout use the same tensors"), vLLM-Omni's test of the published
bundles (an older export spells the stream blocks `visual_transformer_blocks.N.videoT`), and kandinsky-6-sr's
`checkpoint_keys.py` for the SR model. The original (non-diffusers) single files are therefore supported as those
codes describe them, but no original Kandinsky 6 file was available to check against: the diffusers layout is the
one the tests load.

Original single files carry no config.json: ``infer_config`` rebuilds it from the tensor shapes with the release
constants the ComfyUI node uses (axes split head/4, 3/8, 3/8; audio RoPE scaling 0.144; ca_rope and fix_modulation
on; cross_gates read off the va_modulation width).
"""

from __future__ import annotations

from pathlib import Path

from k5.engine.checkpoints import dit as checkpoint
from k5.engine.model.k6_config import K6Config, SRConfig

# (stored, ours) substrings; prefixes first, then names inside a block.
_PREFIXES = (("visual_transformer_blocks.", "visual_blocks."), ("audio_out_layer.", "audio_outLayer."))
_INNER = (
    (".timestep_embedder.linear_1.", ".in_layer."),
    (".timestep_embedder.linear_2.", ".out_layer."),
    (".video_dec_block.", ".videoT."),
    (".audio_dec_block.", ".audioT."),
    (".feed_forward.net.0.proj.", ".feed_forward.in_layer."),
    (".feed_forward.net.2.", ".feed_forward.out_layer."),
    (".attn.", ".self_attention."),  # the text blocks' self-attention
)
_SR_INNER = (
    ("time_embeddings.timestep_embedder.linear_1.", "time_embeddings.in_layer."),
    ("time_embeddings.timestep_embedder.linear_2.", "time_embeddings.out_layer."),
    (".feed_forward.net.0.proj.", ".feed_forward.in_layer."),
    (".feed_forward.net.2.", ".feed_forward.out_layer."),
)


def model_name(stored: str) -> str:
    """The K6 DiT's name for a tensor stored under ``stored`` (diffusers or original layout); idempotent."""
    name = stored
    for source, target in _PREFIXES:
        if name.startswith(source):
            name = target + name[len(source):]
            break
    for source, target in _INNER:
        name = name.replace(source, target)
    return name


def sr_model_name(stored: str) -> str:
    name = stored
    for source, target in _SR_INNER:
        name = name.replace(source, target)
    return name


def _axes(head_dim: int) -> tuple[int, int, int]:
    # The release split of a head (16, 24, 24 of 64; 32, 48, 48 of 128): the ComfyUI node's rule
    return head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8


def infer_config(shapes: dict[str, tuple[int, ...]]) -> K6Config:
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
    count = lambda prefix: len({k.split(".")[1] for k in shapes if k.startswith(prefix + ".")})  # noqa: E731
    token_types = shapes.get("visual_token_type_embeddings.weight", (0,))[0]
    return K6Config(
        in_visual_dim=in_visual_dim, out_visual_dim=out_visual // patch, in_text_dim=in_text_dim,
        in_text_dim2=in_text_dim2, time_dim=time_dim, model_dim=model_dim, ff_dim=ff_dim,
        num_text_blocks=count("video_text_transformer_blocks"), num_visual_blocks=count("visual_blocks"),
        axes_dims=_axes(head_dim), visual_cond=in_channels == 2 * in_visual_dim + 1, in_audio_dim=in_audio_dim,
        out_audio_dim=out_audio_dim, model_dim_a=model_dim_a, time_dim_a=time_dim_a, ff_dim_a=ff_dim_a,
        axes_dims_a=_axes(head_dim_a), audio_freqs_scaling=0.144, scale_factor=(1.0, 2.0, 2.0),
        text_token_padding=True, ca_rope=True, cross_gates=va == 2 * model_dim + model_dim_a, fix_modulation=True,
        visual_token_type_num_embeddings=token_types,
    )


def infer_sr_config(shapes: dict[str, tuple[int, ...]]) -> SRConfig:
    try:
        model_dim, vis_in = shapes["visual_embeddings.in_layer.weight"]
        time_dim = shapes["time_embeddings.out_layer.weight"][0]
        out_visual = shapes["out_layer.out_layer.weight"][0]
        ff_dim = shapes["visual_transformer_blocks.0.feed_forward.in_layer.weight"][0]
        (head_dim,) = shapes["visual_transformer_blocks.0.self_attention.query_norm.weight"]
    except KeyError as e:
        raise ValueError(f"not a Kandinsky 6 SR checkpoint: tensor {e.args[0]} is missing") from None
    count = len({k.split(".")[1] for k in shapes if k.startswith("visual_transformer_blocks.")})
    return SRConfig(in_visual_dim=(vis_in - 1) // 2, out_visual_dim=out_visual, time_dim=time_dim,
                    model_dim=model_dim, ff_dim=ff_dim, num_visual_blocks=count, axes_dims=_axes(head_dim))


def locate(path: str | Path) -> checkpoint.CheckpointFiles:
    """The K6 DiT's weights and config under ``path`` (pipeline root, transformer folder or single file)."""
    return checkpoint.locate(path, K6Config.from_json, infer_config, model_name, what="Kandinsky 6")


def locate_sr(path: str | Path) -> checkpoint.CheckpointFiles:
    return checkpoint.locate(path, SRConfig.from_json, infer_sr_config, sr_model_name, what="Kandinsky 6 SR")
