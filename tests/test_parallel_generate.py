"""setup_parallel end to end on the tiny checkpoint (real text encoders, one per CFG half; the DiT loaded through
the TP reader; the guided hook) against Kandinsky5Pipeline.generate in one process, fp32 latents, rel err <= 1e-4."""

import torch

from distributed import run_distributed
from k5.engine.pipeline import Kandinsky5Pipeline, Request
from k5.engine.tiny import tiny_checkpoint
from k5.parallel.plan import setup_parallel
from numerics import rel_err

REQUEST = dict(prompt="a cat walks on the grass", height=64, width=96, num_frames=5, steps=2, seed=7)


def _generate_worker(rank, world_size, root, degrees):
    par = setup_parallel(root, dtype=torch.float32, device="cpu", **degrees)
    text = par.pipeline.text
    shared = getattr(text, "inner", text)  # SharedText, under BranchText with --cfg-parallel
    loaded = shared.encoder is not None
    result = par.pipeline.generate(Request(**REQUEST), guided=par.guided)
    return dict(latents=result.latents, describe=par.describe(), bytes=par.parameter_bytes,
                loaded_encoder=loaded, holds_encoder_after=shared.encoder is not None,
                coords={d: par.dims.rank(d) for d in ("cfg", "ring", "ulysses", "tp")})


# Two processes only: each imports diffusers and transformers (~4 s CPU on these 2 cores). TP, Ulysses, ring and
# their mixes with CFG are covered at the DiT / sampler level in test_tensor.py and test_cfg.py.
def test_setup_parallel_generate_equals_single_process():
    degrees = dict(cfg_parallel=True)
    root = tiny_checkpoint()
    want = Kandinsky5Pipeline.from_pretrained(root, dtype=torch.float32).generate(Request(**REQUEST)).latents
    results = run_distributed(_generate_worker, 2, root, degrees)
    for r in results:
        assert rel_err(r["latents"], want) <= 1e-4
        assert "cfg 2" in r["describe"] and r["bytes"]["total"] > 0
        assert not r["holds_encoder_after"]  # released after the one encode (keep_text=False)
    # One text encoder per cfg half, on its first rank.
    loaders = [r["coords"] for r in results if r["loaded_encoder"]]
    assert loaders == [dict(cfg=0, ring=0, ulysses=0, tp=0), dict(cfg=1, ring=0, ulysses=0, tp=0)]


def _i2v_worker(rank, world_size, root, image):
    import k5.engine.i2v as i2v

    calls = []
    encode = i2v.encode_image
    i2v.encode_image = lambda *a, **kw: calls.append(1) or encode(*a, **kw)
    par = setup_parallel(root, dtype=torch.float32, device="cpu", ulysses=2)
    result = par.pipeline.generate(Request(**REQUEST, image=image, guidance_scale=1.0))
    return dict(latents=result.latents, encodes=len(calls))


def test_i2v_image_encoded_once_and_shared(tmp_path):
    import numpy as np
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)).save(image)
    root = tiny_checkpoint()
    req = Request(**REQUEST, image=str(image), guidance_scale=1.0)
    want = Kandinsky5Pipeline.from_pretrained(root, dtype=torch.float32).generate(req).latents
    results = run_distributed(_i2v_worker, 2, root, str(image))
    assert [r["encodes"] for r in results] == [1, 0]  # rank 0 of the item encodes, the other receives
    for r in results:
        assert rel_err(r["latents"], want) <= 1e-4
