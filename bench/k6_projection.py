"""A PROJECTION (not a measurement) of Kandinsky 6 seconds per video on 1 to 8 GPUs, by the cost model of
bench/projection.py (its link and rate assumptions, its per-GPU rates) applied to the Kandinsky 6 DiT.

    python -m k5.bench k6-project                   # Pro 5 s SD, sft (50 steps, CFG) and distilled (10 steps)

What differs from Kandinsky 5's model (parallel/k6.py is the layout it describes):
- FLOPs per forward, counted here from the block structure (engine/model/k6_dit.py): the video stream (self-attention,
  cross-attention to its text, the video side of the two cross-modal attentions, FFN) splits over the sequence
  ranks x tp; the audio stream (218 tokens for 5 s) runs whole on every sequence rank (replicated), split over tp;
  the ``av`` attention (audio queries over the video keys) splits with the video keys; both text branches split
  over tp only.
- communication per forward and rank: the Ulysses all-to-alls and ring K/V passes of the video self-attention as
  Kandinsky 5's, the partial ``av`` results (fp32 output + log-sum-exp) all-gathered over the sequence group in every
  block, the tp all-reduces of both streams' row-parallel outputs, and once per step the CFG exchange of both
  streams' predictions.
Not included (as bench/projection.py): text encoding, VAE decode, audio decode, loading.

The official one-H100 figure (356 s, Pro 5 s SD) does not say which checkpoint, steps or offloading it measures; this
model's own one-GPU time for the sft checkpoint (100 forwards of ~3.9 PFLOP) is far above it, and the distilled
checkpoint's (10 forwards) far below. Both efficiencies are printed: against this model's one-GPU time, and against
356 s (8 GPUs at 0.9 efficiency against 356 s means at most 49.4 s).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from k5.bench import report
from k5.bench.projection import Layout, Link, rates_from
from k5.engine.catalogue.k6_variants import OFFICIAL_H100_S, get as get_variant
from k5.launch.k6 import recommended_layout
from k5.engine.model.k6_config import PRESETS, K6Config
from k5.engine.sampling.k6_sampler import audio_length

SHAPES = {"5s-sd": (512, 768, 121)}
CHECKPOINTS = {"sft": ("pro", 50, True), "distill": ("pro-distill", 10, False)}  # preset, steps, CFG


@dataclass(frozen=True)
class K6Flops:
    """FLOPs of one forward (2 x multiply-adds of its matmuls), by how they split over the ranks: ``video_*`` over
    sequence ranks x tp, ``audio_*`` over tp (replicated on every sequence rank), ``text_*`` (both text branches and
    the cross-attentions' text keys and values) over tp only."""

    video_linear: float
    video_attention: float
    audio_linear: float
    audio_attention: float
    text_linear: float
    text_attention: float

    @property
    def linear(self) -> float:
        return self.video_linear + self.audio_linear + self.text_linear

    @property
    def total(self) -> float:
        return self.linear + self.video_attention + self.audio_attention + self.text_attention


def forward_flops(cfg: K6Config, Sv: int, Sa: int, St: int) -> K6Flops:
    """Modulation, norms, embeddings and the output layers left out (< 0.1 % at the released sizes)."""
    v, a = cfg.video, cfg.audio
    D, F, Da, Fa, L, Lt = v.model_dim, v.ff_dim, a.model_dim, a.ff_dim, cfg.num_visual_blocks, cfg.num_text_blocks
    # per block: self q/k/v/out, text q/out, va q/out, FFN; and the video keys/values of the av attention
    video_linear = Sv * (4 * D * D + 2 * D * D + 2 * D * D + 2 * D * F) + 2 * Sv * D * Da
    # score and value products (2 x Sq x Sk x head dims): self, text, va (video queries), av (over video keys)
    video_attn = 2 * Sv * Sv * D + 2 * Sv * St * D + 2 * Sv * Sa * D + 2 * Sa * Sv * Da
    audio_linear = Sa * (4 * Da * Da + 2 * Da * Da + 2 * Da * Da + 2 * Da * Fa) + 2 * Sa * Da * D
    audio_attn = 2 * Sa * Sa * Da + 2 * Sa * St * Da
    text_kv = 2 * St * D * D + 2 * St * Da * Da  # each stream's cross-attention keys/values of its text
    branches = sum(Lt * St * (4 * d * d + 2 * d * f) for d, f in ((D, F), (Da, Fa)))
    branch_attn = sum(Lt * 2 * St * St * d for d in (D, Da))
    return K6Flops(2 * L * video_linear, 2 * L * video_attn, 2 * L * audio_linear, 2 * L * audio_attn,
                   2 * (L * text_kv + branches), 2 * branch_attn)


def comm_bytes(cfg: K6Config, Sv: int, Sa: int, St: int, lay: Layout, elem: int = 2) -> dict[str, dict]:
    """Bytes one rank sends per forward, by collective (parallel/k6.py's layout; Kandinsky 5's rules for the video
    self-attention, bench/projection.py)."""
    v, a = cfg.video, cfg.audio
    D, Da, L, U, R, tp, sp = v.model_dim, a.model_dim, cfg.num_visual_blocks, lay.ulysses, lay.ring, lay.tp, lay.sp
    local = math.ceil(Sv / (64 * sp)) * 64
    out = {}
    if U > 1:
        out["all_to_all"] = {"bytes": 4 * L * local * (D // tp) * elem * (U - 1) // U, "calls": 2 * L,
                             "group": "ulysses"}
    if R > 1:
        out["p2p_ring"] = {"bytes": 2 * L * (R - 1) * local * U * (D // tp // U) * elem, "calls": L * (R - 1),
                           "group": "ring"}
    if sp > 1:  # av partials: fp32 output of this rank's audio heads and their log-sum-exp, every block
        heads_a = a.num_heads // tp
        out["all_gather"] = {"bytes": (sp - 1) * L * Sa * (Da // tp + heads_a) * 4, "calls": 2 * L, "group": "sp"}
    if tp > 1:  # row-parallel outputs: video 4 per block (self, text, va, FFN), audio 4, text branches 2 per block
        rows_v, rows_a = 4 * L * local, 4 * L * Sa
        rows_t = 2 * cfg.num_text_blocks * St
        nbytes = 2 * ((rows_v + rows_t) * D + (rows_a + rows_t) * Da) * elem * (tp - 1) // tp
        out["all_reduce"] = {"bytes": nbytes, "calls": 8 * L + 4 * cfg.num_text_blocks, "group": "tp"}
    return out


def project(cfg: K6Config, Sv: int, Sa: int, St: int, lay: Layout, rates: dict, link: Link, cfg_guided: bool,
            elem: int = 2) -> dict:
    f = forward_flops(cfg, Sv, Sa, St)
    lin, att = rates["linear"] * 1e12, rates["dense_attention"] * 1e12
    t_video_attn = f.video_attention / att / (lay.sp * lay.tp)
    compute = (f.video_linear / lin / (lay.sp * lay.tp) + t_video_attn
               + (f.audio_linear + f.text_linear) / lin / lay.tp + (f.audio_attention + f.text_attention) / att / lay.tp)
    exposed = 0.0
    for kind, c in comm_bytes(cfg, Sv, Sa, St, lay, elem).items():
        span = lay.span(c["group"]) if c["group"] != "sp" else lay.span("ring")
        t = link.seconds(c["bytes"], c["calls"], span)
        if kind == "p2p_ring":
            t -= link.ring_overlap * min(t, t_video_attn)
        exposed += t
    forward = compute + exposed
    forwards = (2 // lay.cfg) if cfg_guided else 1
    exchange = (Sv * cfg.in_visual_dim + Sa * cfg.in_audio_dim) * cfg.n_grid * 4  # fp32 predictions, both streams
    cfg_s = link.seconds(exchange, 1, lay.span("cfg")) if lay.cfg > 1 else 0.0
    return {"layout": str(lay), "gpus": lay.world, "compute_s_per_forward": compute, "comm_s_per_forward": exposed,
            "s_per_step": forwards * forward + cfg_s, "tflop_per_forward": f.total / 1e12}


def layouts(gpus: int, heads: int, guided: bool, max_tp: int) -> list[Layout]:
    out = []
    for c in ((1, 2) if guided else (1,)):
        for tp in range(1, max_tp + 1):
            if gpus % (c * tp) or heads % tp:
                continue
            sp = gpus // (c * tp)
            out += [Layout(ulysses=u, ring=sp // u, tp=tp, cfg=c) for u in range(1, sp + 1)
                    if sp % u == 0 and (heads // tp) % u == 0]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m k5.bench k6-project",
                                description="Projected (not measured) Kandinsky 6 seconds per video.")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--max-tp", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=256, help="prompt tokens after trimming (budget 1024)")
    p.add_argument("--from", dest="from_result", default=None, help="single-GPU dense bench JSON (measured rate)")
    p.add_argument("--out", default=str(report.SCRATCH),
                   help="folder of the result (default: a scratch folder; bench/results only when named)")
    args = p.parse_args(argv)
    link = Link()
    rates, source = rates_from(args.from_result, None)
    rows = []
    for shape, (h, w, frames) in SHAPES.items():
        Sv = ((frames - 1) // 4 + 1) * (h // 16) * (w // 16)
        Sa = audio_length(frames, 24)
        for name, (preset, steps, guided) in CHECKPOINTS.items():
            cfg = PRESETS[preset]
            one = project(cfg, Sv, Sa, args.text_tokens, Layout(), rates, link, guided)["s_per_step"] * steps
            variant = get_variant("k6-pro-5s" if name == "sft" else "k6-pro-distill-5s")
            rec = recommended_layout(variant, 8)
            for gpus in args.gpus:
                candidates = [project(cfg, Sv, Sa, args.text_tokens, lay, rates, link, guided)
                              for lay in layouts(gpus, cfg.num_heads, guided, args.max_tp)]
                best = min(candidates, key=lambda r: r["s_per_step"])
                rows.append({"shape": shape, "checkpoint": name, "steps": steps, "cfg": guided, "video_tokens": Sv,
                             "audio_tokens": Sa, **best, "s_per_video": best["s_per_step"] * steps,
                             "efficiency": one / (gpus * best["s_per_step"] * steps),
                             "efficiency_vs_official_356s": OFFICIAL_H100_S["pro-sd"]
                             / (gpus * best["s_per_step"] * steps)})
            if 8 in args.gpus:  # the layout the catalogue recommends (it fits 80 GB by parallel.memory's estimate)
                lay = Layout(ulysses=rec["ulysses"], ring=rec["ring"], tp=rec["tp"], cfg=rec["cfg"])
                r = project(cfg, Sv, Sa, args.text_tokens, lay, rates, link, guided)
                rows.append({"shape": shape, "checkpoint": name + " (recommended layout)", "steps": steps,
                             "cfg": guided, "video_tokens": Sv, "audio_tokens": Sa, **r,
                             "s_per_video": r["s_per_step"] * steps,
                             "efficiency": one / (8 * r["s_per_step"] * steps),
                             "efficiency_vs_official_356s": OFFICIAL_H100_S["pro-sd"] / (8 * r["s_per_step"] * steps)})
    result = {"name": "projection-k6-pro", "kind": "PROJECTION, not a measurement", "rates_source": source,
              "rates_tflops": rates, "link": vars(link), "official_h100_s": OFFICIAL_H100_S, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{result['name']}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [
        f"# {result['name']}: a PROJECTION, not a measurement (no GPU was used)", "",
        f"Rates: {result['rates_source']}.  ",
        f"Links and latencies: bench/projection.py's defaults ({result['link']['intra_gbps']} GB/s NVLink).  ",
        "Text encoding, VAE decode and audio decode not included. Best layout per GPU count among cfg x ulysses x "
        "ring x tp (weights may not fit: see the recommended-layout rows, which fit 80 GB by parallel.memory's "
        "estimate).", "",
        "| checkpoint | steps | GPUs | layout | TFLOP/fwd | compute s/fwd | exposed comm s/fwd | s/video "
        "| efficiency (vs 1 GPU, this model) | vs official 356 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['checkpoint']} | {r['steps']} | {r['gpus']} | {r['layout']} | {r['tflop_per_forward']:.0f} "
                     f"| {r['compute_s_per_forward']:.3f} | {r['comm_s_per_forward']:.3f} | {r['s_per_video']:.1f} "
                     f"| {r['efficiency']:.2f} | {r['efficiency_vs_official_356s']:.2f} |")
    return "\n".join(lines) + "\n"
