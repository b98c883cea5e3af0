"""The checkpoint's files are checked once per run: a CLI run checks the component folders once, locates the DiT once
and reads every weight file's header once (engine/checkpoints/files.py keeps what it read for the loaders and the
memory estimate). Before issue 20 a run read the DiT config twice and checked the component folders three times."""

import collections

import pytest

from k5.engine.catalogue import resolve as resolve_module
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.engine.checkpoints import dit as dit_module
from k5.engine.checkpoints import files as files_module
from k5.engine.checkpoints.files import Checkpoint, read_headers, weight_files


@pytest.fixture
def counted(monkeypatch):
    """Counts of check_components and locate calls, and every file whose header was read, wherever they are
    called from."""
    calls = collections.Counter()
    headers = []

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    def reading(files):
        headers.extend(files)
        return read_headers(files)

    for module in (resolve_module, dit_module):
        monkeypatch.setattr(module, "check_components", counting("check_components", module.check_components))
        monkeypatch.setattr(module, "locate", counting("locate", dit_module.locate))
    for module in (files_module, dit_module):
        monkeypatch.setattr(module, "read_headers", reading)
    return calls, headers


def test_a_run_checks_the_folders_locates_the_dit_and_reads_each_header_once(tmp_path, counted):
    from k5.launch.generate import main

    calls, headers = counted
    out = tmp_path / "fox.safetensors"
    assert main(["--model", "tiny", "--prompt", "a red fox", "--height", "64", "--width", "64", "--num-frames", "1",
                 "--steps", "1", "--save-latents", str(out)]) == 0
    assert out.exists()
    assert calls == {"check_components": 1, "locate": 1}
    root = tiny_checkpoint()
    every = [f for c in ("transformer", "vae", "text_encoder", "text_encoder_2") for f in weight_files(root / c)
             if f.suffix == ".safetensors"]
    assert sorted(headers) == sorted(every)  # each file once, none missed


def test_the_checkpoint_keeps_what_the_headers_say():
    root = tiny_checkpoint()
    checkpoint = Checkpoint.open(root, dit_module.locate(root))
    vae = read_headers(weight_files(root / "vae"))
    assert checkpoint.tensors["vae"] == vae
    assert checkpoint.bytes("vae") == sum(t.numel * 4 for t in vae.values())  # the tiny VAE is stored in fp32
    assert checkpoint.bytes("vae", dtype_bytes=2) == checkpoint.bytes("vae") // 2
    assert checkpoint.holds("text_encoder", "lm_head.weight") == ("lm_head.weight" in
                                                                   read_headers(weight_files(root / "text_encoder")))
    assert not checkpoint.image
