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
def seed():
    torch.manual_seed(0)
    return 0
