import json

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

from k5.engine.vae.video import VideoVAE, frames_to_uint8

# Small tiles so that a latent of a few pixels already spans several spatial tiles and temporal windows:
# latent tiles 4x4 with stride 3, windows of 3+1 latent frames with stride 2.
SMALL_TILES = dict(
    tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24, tile_sample_stride_width=24,
    tile_sample_min_num_frames=12, tile_sample_stride_num_frames=8,
)


def tiny_vae(seed: int = 0) -> AutoencoderKLHunyuanVideo:
    """The real HunyuanVideo VAE layout (8x spatial, 4x temporal, 16 latent channels) with tiny widths."""
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    # Random init decodes to a narrow range around 0; widen it so the uint8 conversion sees the whole [-1, 1].
    with torch.no_grad():
        vae.decoder.conv_out.conv.weight.mul_(8.0)
    return vae.eval()


def library_frames(vae: AutoencoderKLHunyuanVideo, latents: torch.Tensor) -> torch.Tensor:
    """The reference: the library decode of channels-first, unscaled latents, converted by hand."""
    with torch.no_grad():
        x = vae.decode(latents.permute(0, 4, 1, 2, 3) / vae.config.scaling_factor).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def test_frames_to_uint8_by_hand():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 7, 1, 1).expand(1, 3, 7, 1, 1)
    out = frames_to_uint8(x)
    assert out.shape == (1, 7, 1, 1, 3) and out.dtype == torch.uint8
    # -0.5 -> 63.75 -> 64; 0 -> 127.5 -> 128 (half to even); 0.999 -> 254.87 -> 255
    assert out[0, :, 0, 0, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]


def test_decode_equals_library_call():
    vae = tiny_vae()
    wrapped = VideoVAE(vae, **SMALL_TILES)
    assert vae.use_tiling and vae.tile_sample_min_height == 32 and vae.tile_sample_stride_num_frames == 8
    torch.manual_seed(1)
    latents = torch.randn(1, 6, 5, 7, 16)  # several windows and tiles, non-square
    frames = wrapped.decode(latents)
    assert frames.shape == (1, 4 * (6 - 1) + 1, 40, 56, 3) and frames.dtype == torch.uint8
    ref = library_frames(vae, latents)
    assert torch.equal(frames, ref)  # the same VAE on the same tensor (vae_input keeps the library's op order)
    # The conversion must not be saturated everywhere, or the comparison above would be vacuous.
    assert 0.2 < (frames > 0).float().mean() < 1.0 and (frames < 255).float().mean() > 0.2


def test_default_tiling_is_the_library_default():
    vae = tiny_vae()
    VideoVAE(vae)
    assert vae.use_tiling
    assert (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_min_num_frames) == (256, 256, 16)
    assert (vae.tile_sample_stride_height, vae.tile_sample_stride_width) == (192, 192)
    assert vae.tile_sample_stride_num_frames == 12
    with pytest.raises(TypeError, match="tile_sample_min_height"):
        VideoVAE(tiny_vae(), tile_height=64)


def test_from_pretrained_folder_and_pipeline_layout(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    torch.manual_seed(2)
    latents = torch.randn(1, 2, 3, 4, 16)
    ref = library_frames(vae, latents)
    for folder in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        loaded = VideoVAE.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
        assert loaded.scaling_factor == pytest.approx(0.476986)
        assert loaded.dtype == torch.float32
        state = vae.state_dict()
        assert all(torch.equal(p, state[k]) for k, p in loaded.vae.state_dict().items())  # read exactly
        # The loaded weights are laid out otherwise than the built ones (another GEMM/conv path may round a float
        # differently), and a float at a .5 boundary then rounds to the next uint8 level: one level, rarely.
        diff = (loaded.decode(latents).int() - ref.int()).abs()
        share = (diff > 0).float().mean().item()
        assert diff.max() <= 1 and share <= 1e-3, (
            f"loaded vs built VAE, uint8 frames: {int(diff.max())} levels apart (<= 1), {share:.1e} differ (<= 1e-3)")


def test_from_pretrained_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(ValueError, match="not a HunyuanVideo VAE"):
        VideoVAE.from_pretrained(tmp_path, torch_dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="no VAE config.json"):
        VideoVAE.from_pretrained(tmp_path / "missing", torch_dtype=torch.float32)


def test_decode_rejects_channels_first_latents():
    wrapped = VideoVAE(tiny_vae())
    with pytest.raises(ValueError, match="channels-last"):
        wrapped.decode(torch.randn(1, 16, 2, 3, 4))
