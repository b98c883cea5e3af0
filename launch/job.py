"""The one job loop: a single video and a batch job run through the same code.

A run is a list of items and a destination. ``--prompt ... --output x.mp4`` is a one-item job whose destination is
the explicit paths (k5.launch.destination.OutputFiles: no manifest, no resume, no log folder); ``--prompts FILE --output-dir DIR``
(or ``--prompt ... --output-dir DIR``) is a job folder (``k5.launch.batch.JobFolder``: lock, manifest, resume).
Everything else is shared: the plan (rank 0 makes it, every rank gets it), one stop agreement before loading and at
every denoising step, the deal of items to dp groups, failure handling, progress, writing (checked, then
published), the summary and the exit code, which every rank takes from the same account of the job:

    0    every item of the plan is finished
    143  stopped by SIGTERM (130: SIGINT) before that, whichever rank got the signal
    1    a failure (a rank that raised ends every rank itself, see k5.launch.supervisor)
    2    bad input found at the start (the job folder is locked by another job)
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable

from k5.launch.batch import deal, settings
from k5.launch.logs import LOGGER
from k5.launch.destination import Destination
from k5.launch.engine import Cancelled
from k5.launch.outputs import AudioVideo
from k5.launch.prompts import Item
from k5.launch.signals import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Stopped, signal_name, stop_exit_code
from k5.launch.supervisor import Supervisor

log = logging.getLogger(LOGGER)


class Progress:
    """Rank 0's account of the denoising, on stderr.

    On a terminal: a bar over the job's items (all dp groups; not for a one-item job) and one over the current item's
    steps, drawn at its first step and cleared after its last, so no empty bar waits through loading and text
    encoding and no finished one is drawn again under the lines that follow.

    Elsewhere (a Slurm output file, CI) no bar, whose carriage-return redraws would pile up, but a plain line every
    10% of an item's steps (by count), and also whenever ``every_s`` seconds passed since the last one (a long Pro
    video's steps), e.g. ``item 0: step 12/50 (24%), 3.1 s/step, ETA 2m12s``."""

    def __init__(self, items: int, enabled: bool, terminal: bool | None = None, every_s: float = 30.0):
        from tqdm import tqdm

        self.enabled, self.every_s = enabled, every_s
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.multi = items > 1
        self.items = tqdm(total=items, desc="items", unit="item", position=0, file=sys.stderr,
                          disable=not (enabled and self.terminal and self.multi))
        self.steps = None  # the current item's bar, on a terminal
        self.first = self.last_line = 0.0  # when the item's first step ended, when the last line was printed

    def step(self, item: Item, i: int) -> None:
        """After denoising step ``i`` (0-based) of ``item``."""
        if not self.enabled:
            return
        total, done, now = item.request.steps, i + 1, time.perf_counter()
        if i == 0:
            self.first = self.last_line = now
        if self.terminal:
            from tqdm import tqdm

            if i == 0:
                self._close_steps()
                self.steps = tqdm(total=total, desc="denoising", unit="step", position=1 if self.multi else 0,
                                  leave=False, file=sys.stderr)
            if self.steps is not None:
                self.steps.update(1)
            if done >= total:
                self._close_steps()
            return
        if done * 10 // total > i * 10 // total or now - self.last_line >= self.every_s:
            self.last_line = now
            log.info(step_line(item.index, done, total, now - self.first))

    def set_items(self, n: int) -> None:
        if n != self.items.n:
            self.items.n = n
            self.items.refresh()

    def _close_steps(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def close(self) -> None:
        self._close_steps()
        self.items.close()


def step_line(index: int, done: int, total: int, since_first: float) -> str:
    """``item 3: step 12/50 (24%), 3.1 s/step, ETA 2m12s``; the rate is over the steps after the first (the first
    step's start is not seen here), so the first step's line has none."""
    line = f"item {index}: step {done}/{total} ({100 * done // total}%)"
    if done > 1:
        rate = since_first / (done - 1)
        line += f", {rate:.3g} s/step"
        if done < total:
            line += f", ETA {format_duration(rate * (total - done))}"
    return line


def format_duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def adapter_lines(adapters: tuple) -> list[str]:
    """What the DiT was loaded with: each LoRA merged into its weights, its scale and how many Linear weights it
    changes."""
    return [f"LoRA merged into the DiT: {a.path} at scale {a.scale:g} ({len(a.targets)} "
            f"layer{'' if len(a.targets) == 1 else 's'})" for a in adapters]


def prepare_item(item: Item, engine, dest: Destination, expand: bool) -> tuple[str | None, dict, dict]:
    """Every rank of the item's group, before its denoising: the item's LoRA adapters into the DiT (the base weights
    re-read where the adapters change, nothing when they stay) and, with prompt expansion, the text to encode.

    That text is, as in the reference, the adapters' trigger phrases followed by the expansion; the expansion is
    generated on the group's rank 0 and shared, or taken from the destination's record (a resumed job), and the
    leader records a generated one at once. Returns (the text, or None for the item's own prompt; what the item's
    manifest record and metrics note; the seconds spent, by part)."""
    t0 = time.perf_counter()
    touched = engine.switch_adapters(item.adapters)
    t1 = time.perf_counter()
    notes = {"lora": [a.record() for a in item.adapters]} if item.adapters else {}
    if touched:
        names = ", ".join(f"{a.path.name}:{a.scale:g}" for a in item.adapters) or "none (base weights)"
        log.info("item %d: LoRA %s (%d weights re-read from the checkpoint)", item.index, names, len(touched))
    times = {"lora_switch_s": t1 - t0}
    if not expand:
        return None, notes, times
    expanded, generated = engine.expand(item.request, lambda: dest.recorded_expansion(item))
    times["expand_s"] = time.perf_counter() - t1
    prompt = "".join(a.trigger or "" for a in item.adapters) + expanded
    if engine.leader:
        if generated:
            dest.record_expansion(item, expanded)
        log.info("item %d: expanded prompt (%s): %s", item.index, "generated" if generated else "recorded, reused",
                 prompt)
    notes["prompt_expansion"] = {"expanded": expanded, "encoded": prompt, "generated": bool(generated)}
    return prompt, notes, times


def trigger_notes(items: list[Item], expand: bool) -> list[str]:
    """Without prompt expansion the reference adds no trigger phrase: say so once for each adapter that has one."""
    if expand:
        return []
    adapters = {a.key: a for item in items for a in item.adapters if a.trigger}
    return [f"note: LoRA {a.path} has the trigger phrase {a.trigger!r}; without prompt expansion it is not added to "
            f"the prompt (as in the reference): write it into the prompt, or use --expand-prompt"
            for a in adapters.values()]


def run_items(items: list[Item], engine, sup: Supervisor, dest: Destination, record_base: dict,
              job_settings: dict, needs_frames: bool, expand: bool = False,
              on_step: Callable[[Item, int, int], None] | None = None,
              on_item: Callable[[Item, dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[list[dict], bool]:
    """Run this group's items in order through ``engine`` (k5.launch.engine.Engine, joined to ``sup``); return (the
    metrics of the items this rank wrote, whether the group stopped).

    Every rank of the group agrees on stopping at the same points (before each item here; after each step and
    before the decode in Engine.run), so the group stops together; a stopped item's files are never published.
    ``on_step(item, done, total)``: Engine.run's on_step for the item; ``should_stop``: its cancel check (a Cancelled
    item ends the loop with the exception, unpublished). ``expand``: prompt expansion is on.
    """
    finished = []
    for item in items:
        if sup.agree_stop():
            return finished, True
        sup.begin_item(item.index, f"item {item.index} ({item.where})")
        t0 = time.perf_counter()
        log.info("item %d (%s): %r, seed %d", item.index, item.where, item.request.prompt[:80], item.request.seed)
        forwards0, comm0 = engine.forwards(), len(engine.comm_steps())
        step = None if on_step is None else (lambda done, total, item=item: on_step(item, done, total))

        try:
            prompt, notes, prep_times = prepare_item(item, engine, dest, expand)
            t_gen = time.perf_counter()
            result = engine.run(item.request, on_step=step, should_stop=should_stop, prompt=prompt,
                                decode=needs_frames)
            frames, marks = result.frames, result.step_ends
            decode_s = result.timings.pop("decode_s", 0.0)
            t2 = time.perf_counter()
            if engine.leader:
                text_s = result.timings.get("text_s", 0.0)
                metrics = {
                    "item": item.index, "where": item.where, "output": item.output, "rank": sup.rank,
                    "steps": item.request.steps, "text_s": text_s, "denoise_s": result.timings.get("denoise_s"),
                    "step_s": [b - a for a, b in zip([t_gen + text_s] + marks[:-1], marks)], "decode_s": decode_s,
                    # The item's forwards (both guidance branches) as the runtime knows them, else this rank's count.
                    "dit_forwards": result.forwards or {"run": engine.forwards() - forwards0, "skipped": []},
                    # Measured: the forwards that ran the visual blocks on this (writing) rank (its own branch only
                    # under CFG parallel); a skipped forward runs only the text blocks and the output layer.
                    "visual_stack_runs_on_rank": engine.forwards() - forwards0,
                    "comm_per_step": engine.comm_steps()[comm0:], **prep_times, **notes,
                }
                timings = {**prep_times, **result.timings, "decode_s": decode_s, "total_s": t2 - t0}  # write excluded
                record = {**record_base, "item": item.index, "source": item.source, "line": item.line,
                          "output": item.output, "settings": settings(item, job_settings), "truncated": result.truncated,
                          "timings": timings, "dit_forwards": metrics["dit_forwards"], **notes}
                # An image is one frame: the "image" output (PNG) takes the same uint8 [1, H, W, 3].
                # Kandinsky 6: the video carries its audio track, the latents file the audio latents too.
                video = frames if result.audio_track is None else AudioVideo(frames, *result.audio_track)
                latents = result.latents if result.audio_latents is None else {
                    "latents": result.latents, "audio_latents": result.audio_latents}
                data = {"video": video, "image": frames, "frames": frames, "latents": latents}
                record = dest.write(item, data, record)
                metrics.update(write_s=time.perf_counter() - t2, total_s=time.perf_counter() - t0,
                               files=[str(p) for p in dest.targets(item).values()])
                finished.append(metrics)
                if result.truncated:
                    log.warning("warning: %s: the prompt is longer than the model's text budget (video 256 tokens, "
                                "image 512) and was truncated", item.where)
                if on_item is not None:
                    on_item(item, record)
            if engine.leader:
                sup.item_done()
        except Cancelled:
            log.info("item %d (%s) discarded: cancelled", item.index, item.where)
            raise
        except Stopped:
            log.info("item %d (%s) discarded: stopping", item.index, item.where)
            return finished, True
        except Exception as e:
            if not sup.stop_requested:
                raise
            # e.g. ffmpeg killed by the same SIGTERM: the item's files are gone (write_outputs cleans up); the group
            # learns about the stop at the next agreement, where every rank is.
            log.info("item %d (%s) discarded while stopping (%s: %s)", item.index, item.where, type(e).__name__, e)
            continue
        log.info("item %d done in %.2f s -> %s", item.index, time.perf_counter() - t0, item.output)
    return finished, False


# ---- the whole run --------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    code: int
    status: str  # done, stopped, nothing to do, refused
    plan: dict
    outcome: object = None  # k5.launch.supervisor.Outcome
    runtime: object = None


def record_base(job, rt) -> dict:
    """What every manifest record of this run shares: the checkpoint, the layout, the host."""
    config = job.root / "transformer" / "config.json"
    return {
        "checkpoint": {"model": job.settings["model"], "path": str(job.root),
                       "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
                       **getattr(job, "checkpoint", {})},  # variant, its source, task, repo, revision, magcache
        "layout": {"world": rt.dims.world_size, **rt.dims.degrees, "dp_group": rt.dp_rank},
        "host": socket.gethostname(),
    }


def make_plan(dest, items: list[Item], sup: Supervisor, rank: int) -> dict:
    """Rank 0 starts the destination (for a job folder: lock, clean, verify) and every rank gets the same plan:
    {"pending", "finished"}, or {"error"} for a job that cannot start (another job holds the folder)."""
    if not dest.shared_plan:
        plan = dest.start(items)
        return {"pending": plan.pending, "finished": plan.finished}
    if rank == 0:
        try:
            plan = dest.start(items)
            for note in plan.notes:
                log.info(note)
            shared = {"pending": plan.pending, "finished": plan.finished}
        except ValueError as e:
            shared = {"error": str(e)}
        if sup.channel is not None:
            sup.channel.put("plan", shared)
        return shared
    while (shared := sup.channel.poll("plan")) is None:
        # Rank 0 may be verifying many files. A stop meanwhile reaches it too (the watchdog passes it on) and is
        # agreed on right after the plan; the watchdog ends this wait if rank 0 dies.
        time.sleep(0.1)
    return shared


def run_job(job, sup: Supervisor, rank: int, load: Callable[[bool], object], written: list[str]) -> RunResult:
    """Plan, load, run this rank's items, wait for every rank; return the exit code and what rank 0 reports.

    ``load(keep_text)`` builds the engine (k5.launch.engine.Engine); ``written`` collects the files this process
    wrote.
    """
    dest, items = job.dest, job.items
    plan = make_plan(dest, items, sup, rank)
    if "error" in plan:
        if rank == 0:
            log.error("error: %s", plan["error"])
        sup.finish()
        return RunResult(EXIT_USAGE, "refused", plan)
    pending = plan["pending"]
    if not pending:
        sup.finish()
        return RunResult(EXIT_OK, "nothing to do", plan)
    if sup.agree_stop():  # every rank, before the expensive part: all load or none does
        outcome = sup.finish()
        log.info("stopped by %s before loading", signal_name(outcome.stop_signal))
        return RunResult(stop_exit_code(outcome.stop_signal), "stopped", plan, outcome)

    if len(items) > 1:
        log.info("%d of %d item(s) to do (%d finished before)", len(pending), len(items), plan["finished"])
    t_load = time.perf_counter()
    rt = load(len(pending) > 1)
    load_s = time.perf_counter() - t_load
    if rt.describe:
        log.info(rt.describe)
    for line in adapter_lines(getattr(job, "adapters", ())):
        log.info(line)
    rt.join(sup)
    mine = [items[i] for i in deal(pending, rt.dims.dp, rt.dp_rank)]
    if rt.dims.dp > 1:
        log.info("dp group %d of %d: %d item(s)", rt.dp_rank, rt.dims.dp, len(mine))

    progress = Progress(len(pending), enabled=rank == 0)
    if sup.watchdog is not None and rank == 0:
        sup.watchdog.items_done = progress.set_items

    def on_item(item: Item, record: dict) -> None:
        written.extend(str(p) for p in dest.targets(item).values())
        if sup.channel is None:
            progress.set_items(progress.items.n + 1)

    if rank == 0:
        for note in trigger_notes(items, getattr(job, "expand", False)):
            log.info(note)

    def on_step(item: Item, done: int, total: int) -> None:
        if done <= item.request.steps:  # the decode's count is not a denoising step
            progress.step(item, done - 1)

    finished, _ = run_items(mine, rt, sup, dest, record_base(job, rt), job.settings, job.needs_frames,
                            expand=getattr(job, "expand", False), on_step=on_step, on_item=on_item)
    from k5.launch.metrics import rank_report

    outcome = sup.finish(rank_report(rank, rt.device, rt, load_s, finished))
    if sup.channel is not None and rank == 0:
        progress.set_items(outcome.items_done)
    progress.close()
    if outcome.items_done >= len(pending):
        return RunResult(EXIT_OK, "done", plan, outcome, rt)
    if outcome.stop_signal is not None:
        if rank != 0:  # rank 0 says it on the terminal (last_line); the others in their logs
            log.info("stopped by %s", signal_name(outcome.stop_signal))
        return RunResult(stop_exit_code(outcome.stop_signal), "stopped", plan, outcome, rt)
    return RunResult(EXIT_FAILED, "failed", plan, outcome, rt)


def run_command(args, env, job) -> int:
    """``k5 generate``'s run once its inputs are checked (k5.launch.generate.validate): the process group, logs and
    signals, the supervisor, the job loop with the engine built once, the report; returns the exit code."""
    from k5.launch.channel import exception_text
    from k5.launch.engine import Engine, EngineOptions
    from k5.launch.logs import Logs
    from k5.launch.metrics import report_end, written_note
    from k5.launch.signals import StopSignals
    from k5.launch.supervisor import init_distributed

    if env.world > 1:
        init_distributed(args.timeout, env.device)
    logs = Logs(env.rank, job.dest.log_dir)
    signals = StopSignals()
    signals.install()
    sup = None
    written: list[str] = []
    t_start = time.perf_counter()
    try:
        sup = Supervisor(env.rank, env.world, args.timeout, logs, signals, env.device)
        sup.written_note = lambda: written_note(job, written, sup.job_items_done())
        result = run_job(job, sup, env.rank, lambda keep_text: Engine.load(job, env, EngineOptions.from_args(args), keep_text), written)
        if env.rank == 0:
            report_end(args, job, result, time.perf_counter() - t_start, written)
        code = result.code
    except Exception as e:
        if sup is not None and env.world > 1:
            sup.fail(e)  # tells the other ranks and ends this process
        logs.log.error("error: %s", exception_text(e), exc_info=e)
        logs.log.error(written_note(job, written, 0 if sup is None else sup.job_items_done()))
        code = EXIT_FAILED
    finally:
        signals.restore()
        if sup is not None:
            sup.close()
        job.dest.close()
        logs.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return code
