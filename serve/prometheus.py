"""GET /metrics: the server's state in Prometheus' text exposition format (version 0.0.4).

    k5_ready                          1 once every rank loaded the model
    k5_queue_depth                    jobs waiting
    k5_jobs{status}                   jobs in the store by status (queued, in_progress, completed, failed)
    k5_requests_total{outcome}        since the start: accepted, rejected_queue_full (429), invalid (400)
    k5_jobs_finished_total{outcome}   since the start: completed, failed, cancelled, requeued (stopped with the server)
    k5_step_seconds_sum / _count      denoising steps of the completed jobs (a summary: mean = sum / count)
    k5_dit_forwards_total{kind}       DiT forwards of the completed jobs: run, skipped (MagCache)
    k5_peak_memory_bytes{rank,kind}   each rank's peak memory (CUDA max allocated, or the CPU's max resident set)
"""

from __future__ import annotations


def render(board, counts: dict[str, int], world: int) -> str:
    with board.lock:
        c = dict(board.counters)
        ready, steps_sum, steps_n = board.ready, board.step_s_sum, board.step_s_count
        run, skipped, peaks = board.forwards_run, board.forwards_skipped, dict(board.peaks)
    lines: list[str] = []

    def metric(name: str, kind: str, what: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {what}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            tag = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{tag}}} {value:g}" if tag else f"{name} {value:g}")

    metric("k5_ready", "gauge", "1 once every rank has loaded the model", [({}, int(ready))])
    metric("k5_ranks", "gauge", "processes serving", [({}, world)])
    metric("k5_queue_depth", "gauge", "jobs waiting in the queue", [({}, counts.get("queued", 0))])
    metric("k5_jobs", "gauge", "jobs in the store by status", [({"status": s}, n) for s, n in counts.items()])
    metric("k5_requests_total", "counter", "requests since the start by outcome",
           [({"outcome": o}, c[o]) for o in ("accepted", "rejected_queue_full", "invalid")])
    metric("k5_jobs_finished_total", "counter", "jobs that left the running state since the start, by outcome",
           [({"outcome": o}, c[o]) for o in ("completed", "failed", "cancelled", "requeued")])
    lines.append("# HELP k5_step_seconds denoising step time of the completed jobs")
    lines.append("# TYPE k5_step_seconds summary")
    lines.append(f"k5_step_seconds_sum {steps_sum:.6f}")
    lines.append(f"k5_step_seconds_count {steps_n}")
    metric("k5_dit_forwards_total", "counter", "DiT forwards of the completed jobs (skipped: MagCache)",
           [({"kind": "run"}, run), ({"kind": "skipped"}, skipped)])
    metric("k5_peak_memory_bytes", "gauge", "peak memory of each rank since it started",
           [({"rank": r, "kind": p["kind"]}, p["bytes"]) for r, p in sorted(peaks.items())])
    return "\n".join(lines) + "\n"
