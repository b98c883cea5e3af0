"""The tiny Image Lite checkpoints (kind "t2i" / "i2i"): the diffusers layout that Kandinsky5T2IPipeline and
Kandinsky5I2IPipeline load, the FLUX VAE's structure and constants, a Qwen2.5-VL with a vision tower, byte-identical
rebuilds. Oracles: the libraries' own from_pretrained and the FLUX.1-dev constants written out here."""

import hashlib
import json

import pytest
import torch
from diffusers import AutoencoderKL, Kandinsky5I2IPipeline, Kandinsky5T2IPipeline
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from k5.engine.checkpoints.files import is_image_checkpoint
from k5.engine.catalogue.tiny import build_tiny_checkpoint, tiny_checkpoint


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind, cls, channels",
                         [("t2i", Kandinsky5T2IPipeline, 16), ("i2i", Kandinsky5I2IPipeline, 33)])
def test_loads_as_the_diffusers_image_pipeline(kind, cls, channels):
    folder = tiny_checkpoint(kind=kind)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls.__name__
    assert is_image_checkpoint(folder) and not is_image_checkpoint(tiny_checkpoint())
    pipe = cls.from_pretrained(folder)
    assert pipe.transformer.config.visual_cond == (kind == "i2i")
    assert pipe.transformer.visual_embeddings.in_layer.in_features == 4 * channels
    assert pipe.scheduler.config.shift == 3.0
    vae = pipe.vae
    assert isinstance(vae, AutoencoderKL)
    # FLUX.1-dev VAE constants: 16 latent channels, 8x, scaling 0.3611, shift 0.1159, no quant convs
    assert (vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor) == (16, 0.3611, 0.1159)
    assert vae.quant_conv is None and vae.post_quant_conv is None and len(vae.config.block_out_channels) == 4
    with torch.no_grad():
        z = vae.encode(torch.randn(1, 3, 64, 96)).latent_dist.mode()
        assert z.shape == (1, 16, 8, 12) and vae.decode(z).sample.shape == (1, 3, 64, 96)
    # A Qwen2.5-VL with a vision tower: a windowed block, then a full-attention one; the image processor settings
    # of Qwen2.5-VL-7B-Instruct in tokenizer/.
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder")
    vision = qwen.config.vision_config
    assert (vision.depth, vision.fullatt_block_indexes, vision.out_hidden_size) == (2, [1], 32)
    processor = Qwen2VLImageProcessorPil.from_pretrained(folder / "tokenizer")
    assert (processor.size["longest_edge"], processor.patch_size, processor.merge_size) == (12845056, 14, 2)


def test_t2i_and_i2i_differ_only_in_the_transformer():
    t2i, i2i = digest(tiny_checkpoint(kind="t2i")), digest(tiny_checkpoint(kind="i2i"))
    differ = sorted({k for k in t2i if t2i[k] != i2i.get(k)} | (i2i.keys() ^ t2i.keys()))
    assert differ == ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]


def test_rebuild_is_byte_identical(tmp_path):
    assert digest(build_tiny_checkpoint(tmp_path / "i2i", kind="i2i")) == digest(tiny_checkpoint(kind="i2i"))


def test_bad_kinds(tmp_path):
    with pytest.raises(ValueError, match="kind='t2v'"):
        build_tiny_checkpoint(tmp_path / "a", kind="t2v")
    with pytest.raises(ValueError, match="dense attention"):
        build_tiny_checkpoint(tmp_path / "b", kind="t2i", attention="nabla")
