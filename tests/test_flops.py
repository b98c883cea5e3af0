"""bench/flops.py against torch's own FLOP counter on real forwards, and against the published hand estimates.

FlopCounterMode counts every matrix product torch executes (addmm/mm for the linears); the CPU flash-attention op
has no formula in torch, so the test gives it the textbook one (2 products of 2*B*H*Sq*Sk*D). Both counts are exact
integers, so they must agree exactly.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from k5.bench import flops
from k5.bench.run import TINY, make_inputs, random_dit
from k5.engine.model.config import PRESETS
from k5.engine.sampling.sampler import model_input
from k5.kernels.nabla import block_sparse_attention


def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs):
    b, h, s_q, d = q
    return 4 * b * h * s_q * k[2] * d


def counted(fn) -> int:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg", [TINY, TINY.replace(visual_cond=False, num_text_blocks=2, num_visual_blocks=3,
                                                   axes_dims=(8, 12, 12), ff_dim=96, in_text_dim=20)])
def test_dense_forward_matches_torch_flop_counter(cfg):
    dit = random_dit(cfg, torch.float32, torch.device("cpu"), seed=0)
    grid, text_tokens = (2, 4, 6), 7
    state, cond, _, t = make_inputs(cfg, grid, text_tokens, torch.device("cpu"), seed=1)
    inp = model_input(state, cfg.visual_cond, None)
    with torch.no_grad():
        got = counted(lambda: dit(inp, cond.embeds, cond.pooled, t))
    assert flops.forward_flops(cfg, 2 * 4 * 6, text_tokens).total == got


def test_block_sparse_flops_follow_density():
    """A mask selecting the same number of key tiles in every row: the CPU kernel then computes exactly the
    selected tiles (no padding slots), so torch's count must equal the density-scaled formula."""
    B, H, nq, nk, D, per_row = 1, 2, 6, 10, 16, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n * 64, H, D, generator=g) for n in (nq, nk, nk))
    order = torch.rand(B, H, nq, nk, generator=g).argsort(-1)
    mask = torch.zeros(B, H, nq, nk, dtype=torch.bool).scatter_(-1, order[..., :per_row], True)
    got = counted(lambda: block_sparse_attention(q, k, v, mask))
    assert flops.attention_flops(B, H, nq * 64, nk * 64, D, density=per_row / nk) == got


def test_lite_and_pro_match_published_estimates():
    """Issue 7 / kandinsky5-architecture.md 7.3: Lite 5 s 512x768 about 0.66 PFLOP with 79% attention, Pro 5 s
    512x768 about 3.6 PFLOP, Pro 5 s 768x1280 about 17.3 PFLOP (80% attention); 256 text tokens."""
    sd = flops.latent_grid(512, 768, 121)
    hd = flops.latent_grid(768, 1280, 121)
    assert sd == (31, 32, 48)
    lite = flops.forward_flops(PRESETS["lite"], 31 * 32 * 48, 256)
    pro = flops.forward_flops(PRESETS["pro"], 31 * 32 * 48, 256)
    pro_hd = flops.forward_flops(PRESETS["pro"], hd[0] * hd[1] * hd[2], 256)
    assert lite.total == pytest.approx(0.66e15, rel=0.01)
    assert lite.attention / lite.total == pytest.approx(0.79, abs=0.01)
    assert pro.total == pytest.approx(3.6e15, rel=0.02)
    assert pro_hd.total == pytest.approx(17.3e15, rel=0.01)
    assert pro_hd.attention / pro_hd.total == pytest.approx(0.80, abs=0.01)
    # NABLA scales only the visual self-attention term.
    half = flops.forward_flops(PRESETS["lite"], 31 * 32 * 48, 256, density=0.5)
    assert half.total == pytest.approx(lite.total - 0.5 * lite.self_attention)


def test_latent_grid_and_density_are_checked():
    with pytest.raises(ValueError, match="4k\\+1"):
        flops.latent_grid(512, 768, 120)
    with pytest.raises(ValueError, match="multiples of 16x16"):
        flops.latent_grid(500, 768, 121)
    with pytest.raises(ValueError, match="density"):
        flops.forward_flops(TINY, 64, 8, density=1.5)
