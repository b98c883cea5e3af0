"""The Image Lite pipeline on the tiny t2i / i2i checkpoints against diffusers' Kandinsky5T2IPipeline and
Kandinsky5I2IPipeline (DiT velocity, end-to-end latents, decode) and what reaches the DiT at each step.

Deliberate differences, handed to the oracle or emulated so that the comparison isolates everything else:
- schedule: diffusers' FlowMatchEulerDiscreteScheduler builds its own sigma grid (architecture reference 5.3); our
  sampler is given diffusers' sigmas ("the same sigmas"). The noise is the same draw from the same CPU generator;
- RoPE: diffusers' attention rounds q and k to bf16 after RoPE even in fp32 (tests/test_dit.py); for the fp32 1e-4
  comparisons our apply_rope is made to round the same way. Without that emulation the fp32 velocity differs by
  the rounding alone (measured 2.2e-4 relative, asserted <= 1e-3);
- templates, crops and the half-size Qwen image as in tests/test_image_text.py;
- T2I text: we pad to 512 tokens with a key mask, diffusers runs the unpadded prompt (masked keys contribute nothing).
Measured fp32 relative errors with the emulation: velocity 0 (bitwise), end-to-end latents 1.1e-6 (T2I) and 2.2e-5
(I2I: diffusers hands the VAE a channels-last view of the same pixels, and the convolutions then sum in another order:
the edit latent alone differs by 5e-5); asserted <= 1e-4. bf16 velocity: measured 5e-3, asserted <= 1e-2.
"""

import numpy as np
import pytest
import torch
from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline, Kandinsky5Transformer3DModel
from PIL import Image

import k5.engine.model.dit as dit_module
import k5.engine.sampling.sampler as sampler_module
from k5.engine.pipelines.image_request import ImageRequest, fit_to_bucket, load_source, qwen_image, vae_input
from k5.engine.pipelines.image import ImagePipeline, check_image_checkpoint
from k5.engine.encoders.text import IMAGE, IMAGE_EDIT
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.engine.checkpoints.dit import load_dit, open_checkpoint
from numerics import rel_err
from test_image_text import processor

PROMPT, SEED, STEPS = "a red fox jumps over a fence at sunset", 3, 2


@pytest.fixture(scope="module")
def t2i():
    return tiny_checkpoint(kind="t2i")


@pytest.fixture(scope="module")
def i2i():
    return tiny_checkpoint(kind="i2i")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rgb = (np.random.default_rng(5).random((640, 1408, 3)) * 255).astype(np.uint8)  # a bucket size: no resize
    path = tmp_path_factory.mktemp("src") / "source.png"
    Image.fromarray(rgb).save(path)
    return path


def _apply_rope_bf16(x, cos, sin, _apply=dit_module.apply_rope):
    return _apply(x, cos, sin).to(torch.bfloat16).to(x.dtype)


@pytest.fixture
def diffusers_rounding(monkeypatch):
    monkeypatch.setattr(dit_module, "apply_rope", _apply_rope_bf16)


def diffusers_sigmas(monkeypatch, scheduler):
    """Make our sampler use the diffusers scheduler's sigma grid (N values, then 0)."""
    def grid(steps, shift):
        assert shift == scheduler.config.shift
        scheduler.set_timesteps(steps)
        return scheduler.sigmas.float().cpu()

    monkeypatch.setattr(sampler_module, "timesteps", grid)


def velocity_inputs(channels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 1, 24, 40, channels, generator=g), text=torch.randn(1, 9, 32, generator=g),
                pooled=torch.randn(1, 24, generator=g), t=torch.tensor([613.0]))


def diffusers_velocity(ref, inp, dtype):
    return ref(hidden_states=inp["x"].to(dtype), encoder_hidden_states=inp["text"].to(dtype),
               pooled_projections=inp["pooled"].to(dtype), timestep=inp["t"],  # fp32 t, as ours (test_dit.py)
               visual_rope_pos=[torch.arange(1), torch.arange(12), torch.arange(20)], text_rope_pos=torch.arange(9),
               scale_factor=[1.0, 1.0, 1.0], return_dict=False)[0].float()


@pytest.mark.parametrize("kind, channels", [("t2i", 16), ("i2i", 33)])
def test_dit_velocity_matches_diffusers(kind, channels, monkeypatch):
    folder = tiny_checkpoint(kind=kind) / "transformer"
    inp = velocity_inputs(channels)
    with torch.no_grad():
        ref = Kandinsky5Transformer3DModel.from_pretrained(folder).eval()
        want = diffusers_velocity(ref, inp, torch.float32)
        ours = load_dit(folder, dtype=torch.float32)
        plain = ours(inp["x"], inp["text"], inp["pooled"], inp["t"], scale_factor=(1.0, 1.0, 1.0))
        monkeypatch.setattr(dit_module, "apply_rope", _apply_rope_bf16)
        got = ours(inp["x"], inp["text"], inp["pooled"], inp["t"], scale_factor=(1.0, 1.0, 1.0))
        monkeypatch.undo()
        assert got.shape == (1, 1, 24, 40, 16)
        assert rel_err(got, want) <= 1e-4
        assert rel_err(plain, want) <= 1e-3  # the bf16 rounding of q/k alone

        ref16 = Kandinsky5Transformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
        ours16 = load_dit(folder, dtype=torch.bfloat16)
        got16 = ours16(inp["x"], inp["text"], inp["pooled"], inp["t"], scale_factor=(1.0, 1.0, 1.0))
        assert got16.dtype == torch.bfloat16
        assert rel_err(got16.float(), diffusers_velocity(ref16, inp, torch.bfloat16)) <= 1e-2


def test_t2i_latents_match_diffusers(t2i, monkeypatch, diffusers_rounding):
    ref = Kandinsky5T2IPipeline.from_pretrained(t2i)
    ref.prompt_template, ref.prompt_template_encode_start_idx = IMAGE.template, IMAGE.crop_start
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt=PROMPT, height=1024, width=1024, num_inference_steps=STEPS, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(SEED), output_type="latent").image

    ours = ImagePipeline.from_pretrained(t2i, dtype=torch.float32)
    assert ours.default_shift == ref.scheduler.config.shift == 3.0
    diffusers_sigmas(monkeypatch, ref.scheduler)
    got = ours.generate(ImageRequest(PROMPT, steps=STEPS, seed=SEED)).latents
    assert got.shape == want.shape == (1, 1, 128, 128, 16)
    assert rel_err(got, want) <= 1e-4


def test_i2i_latents_match_diffusers(i2i, source, monkeypatch, diffusers_rounding):
    ref = Kandinsky5I2IPipeline.from_pretrained(i2i)
    ref.tokenizer = processor(i2i)  # the real repos list Qwen2VLProcessor; the tiny a tokenizer (see engine/catalogue/tiny.py)
    ref.prompt_template, ref.prompt_template_encode_start_idx = IMAGE_EDIT.template, IMAGE_EDIT.crop_start
    ref.set_progress_bar_config(disable=True)
    image = Image.open(source).convert("RGB")
    half = Image.fromarray(qwen_image(load_source(source)))
    full_resize = image.resize
    # diffusers halves the image for Qwen with PIL's default filter; hand it ours (module docstring)
    image.resize = lambda size, *a, **k: half if tuple(size) == half.size else full_resize(size, *a, **k)
    want = ref(image=image, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(SEED), output_type="latent").image

    ours = ImagePipeline.from_pretrained(i2i, dtype=torch.float32)
    diffusers_sigmas(monkeypatch, ref.scheduler)
    result = ours.generate(ImageRequest(PROMPT, image=str(source), steps=STEPS, seed=SEED))
    assert (result.request.task, result.request.height, result.request.width) == ("i2i", 640, 1408)
    assert result.latents.shape == want.shape == (1, 1, 80, 176, 16)
    assert rel_err(result.latents, want) <= 1e-4


def record_inputs(pipe, monkeypatch):
    calls = []
    forward = pipe.dit.forward

    def recording(x, text_embeds, pooled, t, **kw):
        calls.append(dict(x=x.clone(), text=text_embeds.clone(), mask=kw.get("text_mask"), scale=kw["scale_factor"]))
        return forward(x, text_embeds, pooled, t, **kw)

    monkeypatch.setattr(pipe.dit, "forward", recording)
    return calls


@pytest.fixture(scope="module")
def i2i_pipe(i2i):
    return ImagePipeline.from_pretrained(i2i, dtype=torch.float32)


def test_i2i_dit_sees_noise_edit_latent_and_ones(i2i_pipe, source, monkeypatch):
    calls = record_inputs(i2i_pipe, monkeypatch)
    i2i_pipe.generate(ImageRequest(PROMPT, image=str(source), steps=2, seed=SEED, guidance_scale=1.0))
    assert len(calls) == 2  # no unconditional pass at guidance 1
    # The edit latent: the posterior sample drawn after the noise from the one seeded generator.
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(1, 1, 80, 176, 16, generator=g)
    edit = i2i_pipe.vae.encode(vae_input(fit_to_bucket(load_source(source), 640, 1408)), generator=g)
    first = calls[0]["x"]
    assert first.shape == (1, 1, 80, 176, 33) and calls[0]["scale"] == (1.0, 1.0, 1.0)
    assert torch.equal(first[..., :16], noise)
    for c in calls:
        assert torch.equal(c["x"][..., 16:32], edit) and bool((c["x"][..., 32] == 1).all())
    assert not torch.equal(calls[1]["x"][..., :16], noise)  # the latent moved; the condition did not


def test_t2i_on_an_i2i_checkpoint_gets_zeros(i2i_pipe, monkeypatch):
    calls = record_inputs(i2i_pipe, monkeypatch)
    r = i2i_pipe.generate(ImageRequest(PROMPT, task="t2i", steps=1, seed=SEED, guidance_scale=3.5,
                                       height=640, width=1408))
    assert r.request.task == "t2i" and len(calls) == 2
    for c in calls:
        assert c["x"].shape[-1] == 33 and torch.count_nonzero(c["x"][..., 16:]) == 0
        assert c["text"].shape[1] == 512  # the "image" template's padded budget
    # negative prompt "" (the image models' default) is the second, unconditional pass
    neg = i2i_pipe.text.encode([""], fmt=IMAGE)
    # a batch of two prompts against the negative alone: another batch size, so another GEMM blocking; fp32 rel 1e-5
    diff = (calls[1]["text"].float() - neg.embeds.float()).norm() / neg.embeds.float().norm()
    assert diff <= 1e-5, f"negative prompt embeddings in the batch vs alone: rel {diff:.2e} > 1e-5"


def test_decode_matches_diffusers_postprocessing(t2i):
    pipe = ImagePipeline.from_pretrained(t2i, dtype=torch.float32)
    ref = Kandinsky5T2IPipeline.from_pretrained(t2i)
    latents = torch.randn(1, 1, 80, 176, 16, generator=torch.Generator().manual_seed(0))
    image = pipe.decode(latents)
    with torch.no_grad():  # diffusers' __call__ decode path, written out: no shift_factor, / scaling_factor
        z = latents.permute(0, 1, 4, 2, 3)[:, 0] / ref.vae.config.scaling_factor
        want = ref.image_processor.postprocess(ref.vae.decode(z).sample, output_type="np")[0]
    assert image.shape == (1, 640, 1408, 3) and image.dtype == torch.uint8
    assert (image[0].int() - torch.from_numpy(np.round(want * 255)).int()).abs().max() <= 1
    assert ref.vae.config.shift_factor == pytest.approx(0.1159)  # present, and ignored by both


def test_nabla_is_refused_for_images(i2i_pipe):
    i2i_pipe.dit.set_attention("nabla")
    try:
        with pytest.raises(ValueError, match="NABLA attention is for video"):
            i2i_pipe.generate(ImageRequest(PROMPT, task="t2i", steps=1))
    finally:
        i2i_pipe.dit.set_attention("dense")


def test_a_video_checkpoint_is_not_an_image_one():
    with pytest.raises(ValueError, match="not a Kandinsky 5 Image Lite checkpoint"):
        check_image_checkpoint(open_checkpoint(tiny_checkpoint()))
