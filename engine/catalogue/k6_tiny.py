"""tiny-k6: a seeded, randomly initialised Kandinsky 6 pipeline in the diffusers folder layout, small enough for a CPU.

Every component of a real ``Kandinsky-6.0-*-Diffusers`` repo (model_index.json, transformer, vae, text_encoder,
tokenizer, text_encoder_2, tokenizer_2, scheduler, audio_vae, vocoder), written by the diffusers and transformers
classes themselves, with the real structure, compression ratios and audio constants (44.1 kHz, 40 latent channels,
1024 samples per latent, 512-sample mel hop) and tiny widths; the DiT has the released flags (ca_rope, cross_gates,
fix_modulation, two token types for I2AV) and unequal stream widths, so a swapped stream fails loudly. Two kinds:
"sft" (velocity output, Euler scheduler, shift 5) and "distill" (PiFlow-widened output, n_grid 10, PiflowScheduler).
Same seed -> byte-identical folder.

The text encoders, tokenizers and HunyuanVideo VAE are the Kandinsky 5 tiny checkpoint's (engine/catalogue/tiny.py), copied:
Kandinsky 6 keeps that text path and VAE, and its tokenizer already gives the 129-token template prefix that both
our encoder and diffusers' Kandinsky 6 pipeline crop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from k5.engine.catalogue.tiny import CLIP_HIDDEN, QWEN_HIDDEN, _quiet_saves, _reinit_, _write_json, tiny_checkpoint

K6_TINY_VERSION = "1"
KINDS = ("sft", "distill", "sr")
N_GRID = 10
SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
AUDIO_SCALING = 0.417  # MMAudioVAE's default; the ComfyUI node gives 0.417 (distilled) and 0.5302 (released sft)

# head_dim 16 in both streams (ca_rope rotates across them); video 4 heads, audio 2
TRANSFORMER = dict(
    in_visual_dim=16, in_text_dim=QWEN_HIDDEN, in_text_dim2=CLIP_HIDDEN, time_dim=32, patch_size=(1, 2, 2),
    model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
    in_audio_dim=40, model_dim_a=32, time_dim_a=24, ff_dim_a=64, axes_dims_a=(4, 6, 6), audio_freqs_scaling=0.144,
    scale_factor=(1.0, 2.0, 2.0), text_token_padding=True, ca_rope=True, cross_gates=True, fix_modulation=True,
    visual_token_type_num_embeddings=2,
)


def _transformer(kind: str, seed: int):
    from diffusers import Kandinsky6Transformer3DModel

    n = N_GRID if kind == "distill" else 1
    return _reinit_(Kandinsky6Transformer3DModel(**TRANSFORMER, out_visual_dim=16 * n, out_audio_dim=40 * n), seed)


def _audio_vae(seed: int):
    from diffusers import MMAudioVAE

    # Real audio constants (44.1 kHz, n_fft 2048, hop 512, 40 latent channels, three levels), tiny widths.
    return _reinit_(MMAudioVAE(mel_bins=16, latent_channels=40, hidden_channels=8, channel_multipliers=(1, 2, 4),
                               layers_per_block=1, sample_rate=44_100, n_fft=2048, hop_length=512,
                               scaling_factor=AUDIO_SCALING), seed)


def _vocoder(seed: int):
    from diffusers import MMAudioVocoder

    # The real upsampling (x512 = the mel hop), one residual kernel, 64 channels halving to 1.
    return _reinit_(MMAudioVocoder(num_mels=16, upsample_initial_channel=64, upsample_rates=(8, 4, 2, 2, 2, 2),
                                   upsample_kernel_sizes=(16, 8, 4, 4, 4, 4), resblock_kernel_sizes=(3,),
                                   resblock_dilation_sizes=((1, 3, 5),)), seed)


# The super-resolution model (kind "sr"): the SR DiT at tiny widths with the real PiFlow output (n_grid 10), NABLA
# on, one trained tile size of 128x128 pixels (an 8x8 latent tile: one NABLA tile), and the K-VAE at tiny widths with
# its real compression (16x spatially, 4x in time).
SR_LATENT = 8
SR_TRANSFORMER = dict(in_visual_dim=SR_LATENT, out_visual_dim=SR_LATENT * N_GRID, time_dim=32, model_dim=64, ff_dim=128,
                      num_visual_blocks=2, axes_dims=(4, 6, 6), nabla_threshold=0.5, nabla_window=(1, 1, 3),
                      tile_sizes=((128, 128),))


def _sr_transformer(seed: int):
    from diffusers import Kandinsky6SRTransformer3DModel

    model = _reinit_(Kandinsky6SRTransformer3DModel(**SR_TRANSFORMER), seed)
    return model


def _sr_vae(seed: int):
    from diffusers import Kandinsky6SRVAE

    return _reinit_(Kandinsky6SRVAE(latent_channels=SR_LATENT, encoder_block_out_channels=(8,) * 5,
                                    decoder_block_out_channels=(8,) * 5, layers_per_block=1), seed)


def build_k6_sr_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_saves():
        _sr_transformer(seed * 16 + 13).save_pretrained(folder / "transformer")
        _sr_vae(seed * 16 + 14).save_pretrained(folder / "vae")
    scheduler = _scheduler_config("distill")
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(folder / "model_index.json", {
        "_class_name": "Kandinsky6SRPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "transformer": ["diffusers", "Kandinsky6SRTransformer3DModel"], "vae": ["diffusers", "Kandinsky6SRVAE"],
    })
    return folder


def _scheduler_config(kind: str) -> dict:
    if kind == "distill":
        return {"_class_name": "PiflowScheduler", "num_train_timesteps": 1000, "shift": 5.0, "n_grid": N_GRID,
                "eps": 1e-6, "final_step_size_scale": 0.5, "num_policy_substeps": 128}
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0}


def build_k6_tiny_checkpoint(folder, seed: int = 0, kind: str = "sft", cache_dir=None) -> Path:
    """Write the folder; ``cache_dir``: where the Kandinsky 5 tiny checkpoint it copies from is (or is built)."""
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use one of {', '.join(KINDS)}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; build the tiny-k6 checkpoint into a new or empty folder")
    if kind == "sr":
        return build_k6_sr_tiny_checkpoint(folder, seed)
    folder.mkdir(parents=True, exist_ok=True)
    shared = tiny_checkpoint(cache_dir, seed=seed)
    for name in SHARED:
        shutil.copytree(shared / name, folder / name)
    with _quiet_saves():
        # Seeds apart from the Kandinsky 5 tiny kinds' (seed * 16 + 0..8)
        _transformer(kind, seed * 16 + (9 if kind == "sft" else 10)).save_pretrained(folder / "transformer")
        _audio_vae(seed * 16 + 11).save_pretrained(folder / "audio_vae")
        _vocoder(seed * 16 + 12).save_pretrained(folder / "vocoder")
    scheduler = _scheduler_config(kind)
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    # "tokenizer" is a plain Qwen2Tokenizer, as in the Kandinsky 5 tiny (the real repos list Qwen2_5_VLProcessor,
    # whose video processor needs torchvision): diffusers' pipeline loads and runs with it.
    _write_json(folder / "model_index.json", {
        "_class_name": "Kandinsky6TI2VAPipeline",
        "_diffusers_version": diffusers.__version__,
        "audio_vae": ["diffusers", "MMAudioVAE"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "Kandinsky6Transformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
        "vocoder": ["diffusers", "MMAudioVocoder"],
    })
    return folder


def k6_tiny_checkpoint(cache_dir=None, seed: int = 0, kind: str = "sft") -> Path:
    """Build once per (kind, seed, version of this file and of the libraries), return the cached folder."""
    import diffusers
    import transformers

    cache_dir = Path(cache_dir or os.environ.get("K5_TINY_CACHE") or Path(tempfile.gettempdir()) / "k5-tiny")
    versions = f"v{K6_TINY_VERSION}-torch{torch.__version__}-tf{transformers.__version__}-df{diffusers.__version__}"
    final = cache_dir / f"k6-{kind}-seed{seed}-{versions}"
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build aside and rename into place: rename is atomic, so a concurrent process sees nothing or a full folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        build_k6_tiny_checkpoint(tmp / "ckpt", seed=seed, kind=kind, cache_dir=cache_dir)
        os.rename(tmp / "ckpt", final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

