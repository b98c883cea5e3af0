"""setup_parallel end to end on the tiny checkpoint (real text encoders, one per CFG half; the DiT loaded through
the TP reader; the CfgParallel stage) against Kandinsky5Pipeline.generate in one process, fp32 latents, rel err <= 1e-4."""

import torch

from distributed import run_distributed
from k5.engine.pipelines.video import Kandinsky5Pipeline, Request
from k5.engine.catalogue.resolve import resolve_model
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.parallel.plan import setup_parallel
from numerics import rel_err

REQUEST = dict(prompt="a cat walks on the grass", height=64, width=96, num_frames=5, steps=2, seed=7)


def _generate_worker(rank, world_size, root, degrees):
    par = setup_parallel(root, dtype=torch.float32, device="cpu", **degrees)
    text = par.pipeline.text
    shared = getattr(text, "inner", text)  # SharedText, under BranchText with --cfg-parallel
    loaded = shared.encoder is not None
    result = par.pipeline.generate(Request(**REQUEST), chain=par.stages)
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
    import k5.engine.sampling.i2v as i2v

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


def single_file_checkpoint(tmp_path):
    """The tiny checkpoint split as a single-file release is used: the DiT as one .safetensors file (its config
    beside it: the tiny shapes are no released model), the other components in a folder without transformer/."""
    import shutil

    root = tiny_checkpoint()
    components = tmp_path / "components"
    components.mkdir()
    for entry in root.iterdir():
        if entry.name != "transformer":
            (components / entry.name).symlink_to(entry)
    dit = tmp_path / "original" / "tiny_t2v.safetensors"
    dit.parent.mkdir()
    shutil.copy(root / "transformer" / "diffusion_pytorch_model.safetensors", dit)
    shutil.copy(root / "transformer" / "config.json", dit.with_name("config.json"))
    return root, resolve_model(str(dit), components=components)


def _resolved_worker(rank, world_size, resolved, degrees):
    par = setup_parallel(resolved, dtype=torch.float32, device="cpu", **degrees)
    return dict(latents=par.pipeline.generate(Request(**REQUEST), chain=par.stages).latents,
                describe=par.describe())


def test_single_file_dit_with_a_components_folder(tmp_path):
    """The DiT from a file and the rest from another folder: one process gives the folder's latents exactly, and
    setup_parallel(resolved) under Ulysses 2 gives them within 1e-4."""
    root, r = single_file_checkpoint(tmp_path)
    assert (r.kind, r.variant, r.dit.name) == ("file", None, "tiny_t2v.safetensors")
    want = Kandinsky5Pipeline.from_pretrained(root, dtype=torch.float32).generate(Request(**REQUEST)).latents
    pipe = Kandinsky5Pipeline.from_resolved(r, dtype=torch.float32)
    assert pipe.root == r.root and not (pipe.root / "transformer").exists()
    # Bitwise: the single file is a byte copy of the folder's, so its weights have the same layout, the same ops run.
    assert torch.equal(pipe.generate(Request(**REQUEST)).latents, want)
    results = run_distributed(_resolved_worker, 2, r, dict(ulysses=2))
    for res in results:
        assert "ulysses 2" in res["describe"]
        assert rel_err(res["latents"], want) <= 1e-4
