"""The run's summary: what every rank measured, put together on rank 0 as one JSON document.

``--metrics-json PATH`` writes it for any run; a job folder always gets ``DIR/metrics.json`` (the latest run's).
``summary`` is the one place where the document is built: a new figure (compile counts, MagCache skips, the
variant) is one more field here, filled from the rank reports.

Fields (times in seconds, bytes as integers; null where not measured):

- ``status`` (done / stopped), ``exit_code``, ``command``, ``model``, ``variant``, ``magcache``, ``dtype``,
  ``attention``;
- ``expand_prompt``: whether prompts were expanded; ``lora``: every LoRA adapter the job's items use (path, sha256,
  scale, layers, ranks, config source, trigger);
- ``layout``: world size and the degrees dp x cfg x ring x ulysses x tp;
- ``items``: in the job, to do in this run, finished before, finished in this run;
- ``times``: wall time of the run and of loading (rank 0), and per stage (text, denoise, decode, write) summed
  over the items;
- ``per_item``: for each item finished in this run (reported by the rank that wrote it): its output, the stage
  times, every denoising step's time, the item's DiT forwards (both guidance branches: how many ran, and the
  skipped ones as [step, "cond"|"uncond"] pairs), the forwards that ran the visual blocks on its writing rank
  (measured by a hook; that rank's own branch only under CFG parallel), and the bytes that rank sent per
  denoising step by collective; with adapters its ``lora``, with expansion its ``prompt_expansion``
  (``expanded``, ``encoded``: the text handed to the encoder, ``generated``) and ``expand_s``;
- ``dit_forwards``: totals over the items (run, skipped);
- ``comm_per_step``: the bytes rank 0 sent in its last denoising step, by collective (the steady state);
- ``ranks``: per rank, the peak memory (CUDA: max allocated; CPU: max resident set), ``memory`` (CUDA: peak
  allocated and reserved over the whole run, the phase of the peak and what was resident then, the VAE decode's own
  peak; the pre-load estimate), compile counts and the dense attention kernel (engine.fastpath.run_summary);
- ``files``: the files this run wrote.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

STAGES = ("text_s", "denoise_s", "decode_s", "write_s")


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory: {"bytes", "kind"}."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda max allocated"}
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "max resident set"}


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def rank_report(rank: int, device: torch.device, runtime, load_s: float | None, items: list[dict]) -> dict:
    """What one rank contributes to the summary (sent to rank 0 through the store: plain JSON values)."""
    from k5.engine.fastpath import run_summary

    fast = run_summary(getattr(runtime, "fast", None), device, getattr(runtime, "estimate", None))
    return {"rank": rank, "peak_memory": peak_memory(device), "load_s": load_s, "items": items, **fast}


def summary(*, args, job, layout: dict, plan: dict, outcome, status: str, exit_code: int, wall_s: float,
            files: list[str]) -> dict:
    reports = sorted(outcome.reports or [], key=lambda r: r.get("rank", 0))
    per_item = sorted((it for r in reports for it in r.get("items", [])), key=lambda it: it["item"])
    stages = {s: round(sum(it.get(s) or 0.0 for it in per_item), 6) for s in STAGES}
    rank0 = next((r for r in reports if r.get("rank") == 0), {})
    last_comm = next((it["comm_per_step"][-1] for it in reversed(per_item)
                      if it.get("rank") == 0 and it.get("comm_per_step")), None)
    return {
        "status": status,
        "exit_code": exit_code,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "model": job.settings["model"],
        "variant": job.settings.get("variant"),
        "magcache": job.settings.get("step_cache") == "magcache",
        "dtype": args.dtype,
        "attention": args.attention,
        "expand_prompt": bool(getattr(job, "expand", False)),
        # Kandinsky 6: whether the videos carry an audio track (None: a Kandinsky 5 model, which has none)
        "audio": job.audio if job.k6 else None,
        "lora": list({a.key: a.record() for item in job.items for a in item.adapters}.values()),
        "layout": layout,
        "items": {"in_job": len(job.items), "to_do": len(plan["pending"]), "finished_before": plan["finished"],
                  "finished": outcome.items_done},
        "times": {"wall_s": round(wall_s, 6), "load_s": rank0.get("load_s"), "stages": stages},
        "per_item": per_item,
        "dit_forwards": {"run": sum(it["dit_forwards"]["run"] for it in per_item),
                         "skipped": sum(len(it["dit_forwards"]["skipped"]) for it in per_item)},
        "comm_per_step": last_comm,
        "ranks": [{"rank": r.get("rank"), "peak_memory": r.get("peak_memory"), "memory": r.get("memory"),
                   "compile": r.get("compile"), "attention_backend": r.get("attention_backend")} for r in reports],
        "files": files,
    }


def write_json(path: str | Path, document: dict) -> None:
    from k5.launch.outputs import replace_atomically

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, json.dumps(document, indent=1, sort_keys=False) + "\n")


# ---- the end of a run (rank 0) --------------------------------------------------------------------------------------

def comm_summary(stats) -> str:
    """Bytes this rank sent in the last denoising step, by collective (Engine.run closes a record per step;
    the first step also carries the text broadcast, so the last one is the steady state)."""
    if not stats.steps:
        return stats.format()
    return "; ".join(f"{kind} {v['bytes'] / 2**20:.3f} MiB in {v['calls']} calls" for kind, v in stats.steps[-1].items())


def written_note(job, written: list[str], items_done: int) -> str:
    """The last line of a failed run: what it wrote before it failed (finished files are kept)."""
    out_dir = job.dest.out_dir
    if out_dir is not None:
        return (f"{items_done} item(s) finished in this run; every finished item stays in {out_dir}; run the same "
                f"command again to resume")
    return f"written before the failure (kept): {', '.join(written)}" if written else "nothing was written"


def last_line(job, result) -> str:
    """The run's last line on rank 0: what happened and which files were written (``result``: k5.launch.job's
    RunResult)."""
    from k5.launch.signals import signal_name

    dest, plan = job.dest, result.plan
    if result.status == "refused":
        return "nothing was written"
    if result.status == "nothing to do":
        return f"nothing to do: all {len(job.items)} item(s) are finished in {dest.out_dir}; nothing was written"
    done = result.outcome.items_done if result.outcome is not None else 0
    if result.status == "done":
        return f"done: wrote {dest.describe(done, plan['finished'])}"
    signal = signal_name(result.outcome.stop_signal if result.outcome is not None else None)
    if result.status == "stopped":
        if dest.out_dir is None:  # explicit paths: the one item was not written
            return f"stopped by {signal} before the video was finished; nothing was written"
        return (f"stopped by {signal}: {done} item(s) finished in this run, {len(plan['pending']) - done} remain in "
                f"{dest.out_dir}; run the same command again to resume")
    return f"failed: {done} item(s) finished in this run"


def report_end(args, job, result, wall_s: float, written: list[str]) -> None:
    """Rank 0: the summary line, the metrics JSON, and the last line, which names the files written."""
    import logging

    from k5.launch.logs import LOGGER

    log = logging.getLogger(LOGGER)
    rt, outcome = result.runtime, result.outcome
    metrics_files = []
    if outcome is not None and outcome.reports is not None and result.status in ("done", "stopped"):
        dims = rt.dims if rt is not None else job.dims  # stopped before loading: the planned layout
        layout = {"world": dims.world_size, **dims.degrees}
        files = written + [str(p) for p in (args.metrics_json, job.dest.metrics_path) if p]
        doc = summary(args=args, job=job, layout=layout, plan=result.plan, outcome=outcome, status=result.status,
                      exit_code=result.code, wall_s=wall_s, files=files)
        items = doc["per_item"]
        if result.status == "done" and items:
            steps = [s for it in items for s in it["step_s"]]
            peak = max((r["peak_memory"]["bytes"] for r in doc["ranks"] if r.get("peak_memory")), default=None)
            fw = doc["dit_forwards"]
            line = (f"summary: {len(items)} item(s) in {wall_s:.1f} s, {sum(steps) / len(steps):.3f} s/step, "
                    f"decode {doc['times']['stages']['decode_s']:.2f} s, peak memory {format_bytes(peak)} "
                    f"(highest rank), variant {doc['variant'] or 'none'}, DiT forwards {fw['run']} run, "
                    f"{fw['skipped']} skipped" + (" (MagCache)" if doc["magcache"] else ""))
            rank0 = next((r for r in doc["ranks"] if r["rank"] == 0 and r.get("compile")), None)
            if rank0 is not None:
                from k5.engine.fastpath import format_summary

                line += "; rank 0: " + format_summary(rank0)
            if rt.stats is not None:
                line += f", sent per denoising step: {comm_summary(rt.stats)}"
            log.info(line)
            for decode_line in rt.decode_report:
                log.info(decode_line)
        for path in (job.dest.metrics_path, args.metrics_json):
            if path:
                write_json(path, doc)
                metrics_files.append(str(path))
    line = last_line(job, result)
    if metrics_files and result.status == "done":
        line += f"; metrics: {', '.join(metrics_files)}"
    log.info(line)
