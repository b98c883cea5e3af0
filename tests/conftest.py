import os
import sys

import pytest
import torch

# Tests run with tiny shapes on 2 cores; one intra-op thread per test process avoids oversubscription
# under pytest-xdist.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def no_loading(monkeypatch):
    """Any weight loading fails the test: a refusal must come before it."""
    from k5.engine.checkpoints import dit as dit_checkpoint
    from k5.engine.pipelines.image import ImagePipeline
    from k5.engine.vae.image import ImageVAE
    from k5.engine.pipelines.video import Kandinsky5Pipeline
    from k5.engine.encoders.text import TextEncoder
    from k5.engine.vae.video import VideoVAE

    def loaded(*a, **k):
        raise AssertionError("weights were loaded for a run that must be refused first")

    for cls in (Kandinsky5Pipeline, ImagePipeline, TextEncoder, VideoVAE, ImageVAE):
        monkeypatch.setattr(cls, "from_pretrained", loaded)
    monkeypatch.setattr(dit_checkpoint, "load", loaded)  # every DiT is built there


@pytest.fixture
def inject_fault():
    """``inject_fault(spec)``: tests/faults' injection (K5_TEST_FAIL syntax) in this process, for in-process runs;
    returns its undo, which also runs after the test. Child processes get it with faults.k5_faults.child_env."""
    from faults.k5_faults import install

    undos = []

    def inject(spec: str):
        undo = install(spec)
        undos.append(undo)
        return undo

    yield inject
    for undo in reversed(undos):
        undo()


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist's default distribution: the tests of one server module (tests/test_serve_*.py) go to one
    worker, so they share the server its module-scoped fixture starts instead of each worker starting its own; every
    other test is a unit of its own, dealt to whichever worker is free. (xdist's own `--dist loadgroup` marks tests
    by rewriting their node ids, which pytest 9 no longer allows.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerPerServer(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if os.path.basename(module).startswith("test_serve_") else nodeid

    return OneWorkerPerServer(config, log)
