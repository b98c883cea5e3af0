"""A PROJECTION (not a measurement) of seconds per denoising step on 1 to 8 GPUs and on several nodes.

    python -m k5.bench project                      # Pro, 5 s and 10 s, SD and HD, 1-32 GPUs, H100 assumptions
    python -m k5.bench project --from lite-5s-dense.json --from-nabla lite-10s-nabla.json   # measured GPU rates

How it is computed, per denoising step (CFG: two forwards):
- compute: the analytical FLOPs (flops.py) over per-GPU rates. The visual blocks split over the sequence-parallel
  (ulysses x ring) and tensor-parallel ranks; the text blocks split over tp only (every sequence-parallel rank
  runs them); embeddings and the output layer are replicated. Rates are achieved TFLOP/s of one GPU: linear
  layers, dense attention and NABLA attention. With --from they come from a measured single-GPU bench run (one
  rate for the whole forward); otherwise they are ASSUMED fractions of the H100's measured 798 TFLOP/s bf16 matrix
  rate (KINDS.md) and say so in the output.
- communication: the bytes each rank sends, counted by the same rules as parallel/comm_stats.py (tests check this
  model against the bytes the real collectives count), over the bandwidth of the link the group runs on, plus a
  latency per collective. Groups are laid out as the mesh lays them out (tp fastest, then ulysses, ring, cfg): a
  group whose ranks span more than --gpus-per-node GPUs runs at the inter-node bandwidth. Ulysses all-to-alls,
  tp all-reduces and the final gathers are on the critical path; ring K/V passes overlap the attention of the
  same block, but only --ring-overlap (default 0.8) of it hides (NCCL kernels take SMs from the attention); the
  CFG all-gather is once per step.
- NABLA density of trained weights is not known here (random weights give density ~ P): --density sets it; the
  default is the grid's STA prior plus 5% of the tiles, a stated assumption.

Link bandwidth defaults (achieved bus bandwidth, not the datasheet): NVLink 4 on H100/H200 SXM is 900 GB/s
bidirectional per GPU, 450 GB/s each way, of which NCCL all-to-all and all-reduce reach ~350 GB/s: --intra-gbps 350.
InfiniBand NDR is 400 Gb/s = 50 GB/s per GPU (one HCA per GPU), NCCL reaches ~40 GB/s: --inter-gbps 40.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from k5.bench import flops, report
from k5.engine.model.config import PRESETS, DiTConfig
from k5.kernels.nabla import NABLA_WINDOW, sta_block_mask

H100_BF16_TFLOPS = 798.0  # measured 8192^3 bf16 matmul on random data (device KINDS.md, 2026-11-13)
# Assumed fractions of that rate until bench/gpu.sh measures them: cuBLAS GEMMs at these sizes, cuDNN/flash
# attention at head_dim 64-128, FlexAttention block-sparse.
# Sanity anchor: the official code's Pro 5 s SD on one H100 is 560 s per 100 forwards (FA3), 5.6 s per 3.6 PFLOP
# forward: 0.8 of that rate for the whole forward.
ASSUMED_EFFICIENCY = {"linear": 0.8, "dense_attention": 0.8, "nabla_attention": 0.5}

SHAPES = {  # name: (height, width, frames, attention, NABLA P): the Pro video settings (architecture ref. 7.3)
    "5s-sd": (512, 768, 121, "dense", None),
    "10s-sd": (512, 768, 241, "nabla", 0.9),
    "5s-hd": (768, 1280, 121, "nabla", 0.8),
    "10s-hd": (768, 1280, 241, "nabla", 0.8),
}


@dataclass(frozen=True)
class Layout:
    ulysses: int = 1
    ring: int = 1
    tp: int = 1
    cfg: int = 1

    @property
    def world(self) -> int:
        return self.ulysses * self.ring * self.tp * self.cfg

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def span(self, dim: str) -> int:
        """How many consecutive ranks one group of ``dim`` covers (mesh order: tp fastest, then ulysses, ring, cfg)."""
        order = ["tp", "ulysses", "ring", "cfg"]
        return math.prod(getattr(self, d) for d in order[: order.index(dim) + 1])

    def __str__(self) -> str:
        parts = [f"{k}{getattr(self, k)}" for k in ("cfg", "ulysses", "ring", "tp") if getattr(self, k) > 1]
        return "x".join(parts) or "single"


def comm_bytes(cfg: DiTConfig, tokens: int, text_tokens: int, lay: Layout, elem: int = 2) -> dict[str, dict]:
    """Bytes one rank sends per forward, by collective, as parallel/comm_stats.py counts them.

    ``elem``: bytes per activation element (2 for bf16). Sequence shards are whole 64-token blocks (the sequence is
    padded up to sp x 64-token blocks).
    """
    n_vb, n_tb, D, U, R, tp, sp = cfg.num_visual_blocks, cfg.num_text_blocks, cfg.model_dim, lay.ulysses, \
        lay.ring, lay.tp, lay.sp
    local = math.ceil(tokens / (64 * sp)) * 64  # tokens per sequence-parallel rank
    d_tp = D // tp
    out_ch = math.prod(cfg.patch_size) * cfg.out_visual_dim
    out = {}
    if U > 1:  # q, k, v to heads (one packed all-to-all) and the output back: 4 tensors per visual block
        out["all_to_all"] = {"bytes": 4 * n_vb * local * d_tp * elem * (U - 1) // U, "calls": 2 * n_vb,
                             "group": "ulysses"}
    if R > 1:  # K and V of a span (local*U tokens, heads/U), one packed buffer passed R-1 times per visual block
        out["p2p_ring"] = {"bytes": 2 * n_vb * (R - 1) * local * U * (d_tp // U) * elem,
                           "calls": n_vb * (R - 1), "group": "ring"}
    if tp > 1:  # row-parallel outputs: 3 per visual block (S_local tokens), 2 per text block (all text tokens)
        rows = 3 * n_vb * local + 2 * n_tb * text_tokens
        out["all_reduce"] = {"bytes": 2 * rows * D * elem * (tp - 1) // tp, "calls": 3 * n_vb + 2 * n_tb,
                             "group": "tp"}
    gathers = {}
    if sp > 1:  # the 64-channel output of the local tokens, once per forward
        gathers["sp"] = (sp - 1) * local * out_ch * elem
    if tp > 1:  # modulation vectors (fp32) of every block and the output layer
        mod = (9 * n_vb + 6 * n_tb + 2) * (D // tp) * 4
        gathers["tp"] = (tp - 1) * mod
    if gathers:
        group = "sp" if "sp" in gathers else "tp"
        out["all_gather"] = {"bytes": sum(gathers.values()), "calls": (sp > 1) + (tp > 1) * (n_vb + n_tb + 1),
                             "group": group}
    return out


def cfg_bytes_per_step(grid: tuple[int, int, int], cfg: DiTConfig, lay: Layout) -> int:
    """The CFG exchange: each half sends its fp32 velocity (the latent, 16 channels) to the other, once per step."""
    if lay.cfg == 1:
        return 0
    T, H, W = grid
    return (lay.cfg - 1) * T * H * W * math.prod(cfg.patch_size) * cfg.out_visual_dim * 4


def default_density(grid: tuple[int, int, int], P: float) -> float:
    """STA prior of the grid (exact) plus 5% of the tiles for the top-CDF selection: an assumption, see above."""
    T, H, W = grid
    sta = sta_block_mask(T, H // 8, W // 8, *NABLA_WINDOW).float().mean().item()
    return min(1.0, sta + 0.05)


@dataclass(frozen=True)
class Link:
    intra_gbps: float = 350.0
    inter_gbps: float = 40.0
    gpus_per_node: int = 8
    latency_us: float = 20.0
    ring_overlap: float = 0.8

    def seconds(self, nbytes: float, calls: int, span: int) -> float:
        bw = self.intra_gbps if span <= self.gpus_per_node else self.inter_gbps
        return nbytes / (bw * 1e9) + calls * self.latency_us * 1e-6


def project_step(cfg: DiTConfig, grid, text_tokens: int, lay: Layout, rates: dict, link: Link,
                 density: float = 1.0, elem: int = 2) -> dict:
    """Projected seconds per denoising step (2 forwards with CFG) for one layout."""
    tokens = math.prod(grid)
    full = flops.forward_flops(cfg, tokens, text_tokens, density=density)
    outside = flops.forward_flops(cfg.replace(num_visual_blocks=0, num_text_blocks=0), tokens, text_tokens)
    with_text = flops.forward_flops(cfg.replace(num_visual_blocks=0), tokens, text_tokens)
    attn_rate = rates["nabla_attention"] if density < 1.0 else rates["dense_attention"]
    to_s = lambda fl, rate: fl / (rate * 1e12)  # noqa: E731
    shard = lay.sp * lay.tp
    t_attn = to_s(full.self_attention + full.cross_attention, attn_rate) / shard
    compute = (
        to_s(full.linear - with_text.linear, rates["linear"]) / shard + t_attn  # visual blocks: split sp x tp
        + (to_s(with_text.linear - outside.linear, rates["linear"])  # text blocks: split over tp only
           + to_s(full.text_attention, rates["dense_attention"])) / lay.tp
        + to_s(outside.linear, rates["linear"])  # embeddings and output layer: replicated
    )
    comm = comm_bytes(cfg, tokens, text_tokens, lay, elem)
    exposed = 0.0
    for kind, c in comm.items():
        span = lay.span(c["group"]) if c["group"] != "sp" else lay.span("ring")
        t = link.seconds(c["bytes"], c["calls"], span)
        if kind == "p2p_ring":
            t = t - link.ring_overlap * min(t, t_attn)  # partly hidden behind the attention (double-buffered K/V)
        exposed += t
    forward = compute + exposed
    forwards_in_series = 2 // lay.cfg  # CFG halves run their branch at the same time
    cfg_s = link.seconds(cfg_bytes_per_step(grid, cfg, lay), 1 if lay.cfg > 1 else 0, lay.span("cfg"))
    step = forwards_in_series * forward + cfg_s
    return {"layout": str(lay), "gpus": lay.world, "compute_s_per_forward": compute, "comm_s_per_forward": exposed,
            "s_per_step": step, "bytes_per_rank_per_forward": sum(c["bytes"] for c in comm.values()),
            "weights_gib_per_gpu": _weight_bytes(cfg, lay.tp, elem) / 2**30}


def _weight_bytes(cfg: DiTConfig, tp: int, elem: int) -> float:
    D, F, Dt = cfg.model_dim, cfg.ff_dim, cfg.time_dim
    block = 4 * D * D + 2 * D * F  # self-attention (and text) projections + FFN
    visual = cfg.num_visual_blocks * ((block + 4 * D * D) * elem + 9 * D * Dt * 4)  # + cross-attention, fp32 mod
    text = cfg.num_text_blocks * (block * elem + 6 * D * Dt * 4)
    return (visual + text) / tp + cfg.in_text_dim * D * elem


def layouts(gpus: int, heads: int, max_tp: int = 1) -> list[Layout]:
    out = []
    for cfg in (1, 2):
        for tp in range(1, max_tp + 1):
            if gpus % (cfg * tp) or heads % tp:
                continue
            sp = gpus // (cfg * tp)
            for u in range(1, sp + 1):
                if sp % u == 0 and (heads // tp) % u == 0:
                    out.append(Layout(ulysses=u, ring=sp // u, tp=tp, cfg=cfg))
    return out


def rates_from(dense_result: str | None, nabla_result: str | None) -> tuple[dict, str]:
    """Per-GPU rates: assumed, or measured from single-GPU bench runs (a dense one, optionally a NABLA one)."""
    rates = {k: v * H100_BF16_TFLOPS for k, v in ASSUMED_EFFICIENCY.items()}
    if dense_result is None:
        return rates, (f"ASSUMED: fractions {ASSUMED_EFFICIENCY} of the H100's measured {H100_BF16_TFLOPS} TFLOP/s "
                       f"bf16 matmul; replace with --from a measured single-GPU bench run")
    r = _single_gpu_run(dense_result)
    achieved = r["timing"]["tflops_per_device"]
    rates.update(linear=achieved, dense_attention=achieved)
    source = f"MEASURED: {achieved:.0f} TFLOP/s for the whole dense forward in {dense_result} ({r['env']['device']})"
    if nabla_result is None:
        return rates, source + f"; NABLA attention ASSUMED {rates['nabla_attention']:.0f} TFLOP/s"
    n = _single_gpu_run(nabla_result)
    f = n["flops"]  # TFLOP per forward; everything but the visual self-attention at the dense rate
    rest = (f["total"] - f["self_attention"]) / achieved
    attn_s = n["timing"]["s_per_forward"] - rest
    if attn_s <= 0:
        raise ValueError(f"{nabla_result}: the forward is faster than its non-attention part at the dense rate")
    rates["nabla_attention"] = f["self_attention"] / attn_s
    return rates, source + (f"; NABLA attention {rates['nabla_attention']:.0f} TFLOP/s from {nabla_result} "
                            f"(density {n['nabla']['density']:.3f})")


def _single_gpu_run(path: str) -> dict:
    r = json.loads(Path(path).read_text())
    if "timing" not in r or r["config"]["world_size"] != 1:
        raise ValueError(f"{path} is not a single-device bench run of the DiT; pass one made by bench/gpu.sh")
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m k5.bench project", description="Projected (not measured) s/step.")
    p.add_argument("--model", default="pro", choices=list(PRESETS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--max-tp", type=int, default=1, help="also consider tensor parallel up to this degree")
    p.add_argument("--density", type=float, default=None, help="NABLA tile density (default: STA prior + 5%)")
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--intra-gbps", type=float, default=Link.intra_gbps, help="NVLink bus bandwidth, GB/s")
    p.add_argument("--inter-gbps", type=float, default=Link.inter_gbps, help="InfiniBand per GPU, GB/s")
    p.add_argument("--gpus-per-node", type=int, default=Link.gpus_per_node)
    p.add_argument("--latency-us", type=float, default=Link.latency_us)
    p.add_argument("--ring-overlap", type=float, default=Link.ring_overlap,
                   help="fraction of ring K/V traffic hidden behind attention")
    p.add_argument("--from", dest="from_result", default=None, help="single-GPU dense bench JSON (measured rate)")
    p.add_argument("--from-nabla", default=None, help="single-GPU NABLA bench JSON (measured NABLA rate)")
    p.add_argument("--out", default=str(report.SCRATCH),
                   help="folder of the result (default: a scratch folder; bench/results only when named)")
    args = p.parse_args(argv)

    cfg = PRESETS[args.model].replace(attention_type="regular", attention_P=None)
    link = Link(args.intra_gbps, args.inter_gbps, args.gpus_per_node, args.latency_us, args.ring_overlap)
    rates, source = rates_from(args.from_result, args.from_nabla)
    rows = []
    for shape in args.shapes:
        h, w, frames, attention, P = SHAPES[shape]
        grid = flops.latent_grid(h, w, frames, cfg.patch_size)
        density = 1.0 if attention == "dense" else (args.density or default_density(grid, P))
        base = project_step(cfg, grid, args.text_tokens, Layout(), rates, link, density)["s_per_step"]
        for gpus in args.gpus:
            best = min((project_step(cfg, grid, args.text_tokens, lay, rates, link, density)
                        for lay in layouts(gpus, cfg.num_heads, args.max_tp)), key=lambda r: r["s_per_step"])
            rows.append({"shape": shape, "tokens": math.prod(grid), "attention": attention, "density": density,
                         **best, "s_per_video": best["s_per_step"] * args.steps,
                         "efficiency": base / (gpus * best["s_per_step"])})
    result = {"name": f"projection-{args.model}", "kind": "PROJECTION, not a measurement", "rates_source": source,
              "rates_tflops": rates, "link": vars(link), "steps": args.steps, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{result['name']}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    link = result["link"]
    lines = [
        f"# {result['name']}: a PROJECTION, not a measurement", "",
        f"Rates: {result['rates_source']}.  ",
        f"Links: {link['intra_gbps']} GB/s within a node of {link['gpus_per_node']} GPUs (NVLink), "
        f"{link['inter_gbps']} GB/s between nodes (InfiniBand), {link['latency_us']} us per collective, "
        f"{link['ring_overlap']:.0%} of ring traffic hidden behind attention.  ",
        f"Best layout per GPU count among cfg x ulysses x ring (x tp); {result['steps']} steps per video; "
        f"text encoding and VAE decode not included.", "",
        "| shape | tokens | attention (density) | GPUs | layout | compute s/fwd | exposed comm s/fwd | s/step "
        "| s/video | efficiency | weights GiB/GPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['attention']} ({r['density']:.2f}) | {r['gpus']} | {r['layout']} "
            f"| {r['compute_s_per_forward']:.3f} | {r['comm_s_per_forward']:.3f} | {r['s_per_step']:.3f} "
            f"| {r['s_per_video']:.0f} | {r['efficiency']:.2f} | {r['weights_gib_per_gpu']:.1f} |"
        )
    return "\n".join(lines) + "\n"
